"""Joint tuning of a pruned chain of linear layers (``x @ W + b``, ReLU between) towards the
original chain's output, with each weight's zeros kept: block reconstruction.

Refitting layer by layer matches each layer's own output; the layers after a pruned one can also
make up for it. Gradient steps (Adam, minibatches) on the chain's squared output error, relative to
the target's mean square, move every kept weight and bias at once. A share of the rows is held out
and the weights of the best held-out error are returned, so the steps stop helping before they
start fitting the calibration rows' noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ChainFit", "chain_forward", "tune_chain"]

#: Adam's moment decay rates and step size (the usual ones; the error is relative, so one rate
#: serves layers of any scale).
BETAS = (0.9, 0.999)
LEARNING_RATE = 1e-3
#: Rows a step; every ``CHECK_EVERY`` steps the held-out error is measured.
MINIBATCH = 256
CHECK_EVERY = 25


@dataclass(frozen=True)
class ChainFit:
    weights: list[np.ndarray]
    biases: list[np.ndarray]
    #: Held-out error (mean square relative to the target's) before and after.
    error_before: float
    error_after: float
    steps: int


def chain_forward(weights: list[np.ndarray], biases: list[np.ndarray], x: np.ndarray) -> list[np.ndarray]:
    """Activations of the chain on ``x``: its input, each hidden layer after ReLU, and the last
    layer's output (no ReLU). Weights are ``[d_in, d_out]``."""
    activations = [x]
    for index, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        z = activations[-1] @ weight + bias
        activations.append(np.maximum(z, 0.0) if index < len(weights) - 1 else z)
    return activations


def _relative_error(weights: list[np.ndarray], biases: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    out = chain_forward(weights, biases, x)[-1]
    return float(np.mean((out - y) ** 2) / max(float(np.mean(y**2)), 1e-30))


def tune_chain(
    x: np.ndarray,
    y: np.ndarray,
    weights: list[np.ndarray],
    biases: list[np.ndarray],
    steps: int,
    biased: list[bool] | None = None,
    held_out: float = 0.125,
    seed: int = 0,
) -> ChainFit:
    """Tune ``weights``/``biases`` (zeros stay zero; the bias of a layer ``biased`` marks False
    stays as given, for a layer that stores none) so that the chain maps ``x`` to ``y``.

    ``x`` ``[rows, d_in]`` is the chain's input as the pruned model computes it, ``y`` ``[rows,
    d_out]`` what the original chain gave on the same examples. Returns the weights with the least
    held-out error seen (the given ones when no step improved on them).
    """
    # Single precision: the steps are matrix products that take half the time of double ones,
    # and the held-out error they chase is far above float32's rounding.
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    count = max(1, int(len(x) * held_out))
    check, train = order[:count], order[count:]
    weights = [np.array(w, dtype=np.float32) for w in weights]
    biases = [np.array(b, dtype=np.float32) for b in biases]
    masks = [w != 0 for w in weights]
    bias_steps = [1.0 if has else 0.0 for has in (biased or [True] * len(biases))]
    scale = max(float(np.mean(y[train] ** 2)), 1e-30)
    params = [*weights, *biases]
    first, second = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    best = before = _relative_error(weights, biases, x[check], y[check])
    best_params = [p.copy() for p in params]
    for step in range(1, steps + 1):
        rows = train[rng.integers(0, len(train), size=min(MINIBATCH, len(train)))]
        activations = chain_forward(weights, biases, x[rows])
        grad = 2.0 * (activations[-1] - y[rows]) / (activations[-1].size * scale)
        grads_w: list[np.ndarray] = [np.empty(0)] * len(weights)
        grads_b: list[np.ndarray] = [np.empty(0)] * len(biases)
        for index in range(len(weights) - 1, -1, -1):
            grads_w[index] = activations[index].T @ grad * masks[index]
            grads_b[index] = grad.sum(axis=0) * bias_steps[index]
            if index:
                grad = (grad @ weights[index].T) * (activations[index] > 0)
        for k, (param, gradient) in enumerate(zip(params, [*grads_w, *grads_b], strict=True)):
            first[k] = BETAS[0] * first[k] + (1 - BETAS[0]) * gradient
            second[k] = BETAS[1] * second[k] + (1 - BETAS[1]) * gradient * gradient
            corrected = first[k] / (1 - BETAS[0] ** step)
            param -= LEARNING_RATE * corrected / (np.sqrt(second[k] / (1 - BETAS[1] ** step)) + 1e-12)
        for weight, mask in zip(weights, masks, strict=True):
            weight *= mask
        if step % CHECK_EVERY == 0:
            error = _relative_error(weights, biases, x[check], y[check])
            if error < best:
                best, best_params = error, [p.copy() for p in params]
    tuned = len(weights)
    return ChainFit(best_params[:tuned], best_params[tuned:], before, best, steps)
