"""Joint tuning of a pruned chain of linear layers (``x @ W + b``, ReLU between) towards the
original chain's output, with each weight's zeros kept: block reconstruction.

Refitting layer by layer matches each layer's own output; the layers after a pruned one can also
make up for it. Gradient steps (Adam, minibatches) on the chain's squared output error, relative to
the target's mean square, move every kept weight and bias at once. A share of the rows is held out
and the weights of the best held-out error are returned, so the steps stop helping before they
start fitting the calibration rows' noise.

Two chains whose outputs meet only in a dot product (a two-tower model's user and item towers,
cosine or plain) are tuned together on that product instead (:func:`tune_pair`): what the model
reads of each tower is its component along the other tower's outputs, and every row of one side
against every row of the other is a product the original computes, so a minibatch of ``n`` rows
gives ``n²`` targets instead of ``n`` tower outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ChainFit", "PairFit", "chain_forward", "pair_loss", "pair_scores", "tune_chain", "tune_pair"]

#: Adam's moment decay rates and step size (the usual ones; the error is relative, so one rate
#: serves layers of any scale).
BETAS = (0.9, 0.999)
LEARNING_RATE = 1e-3
#: Rows a step; every ``CHECK_EVERY`` steps the held-out error is measured.
MINIBATCH = 256
CHECK_EVERY = 25
#: The floor of a row's norm when normalising (as ``torch.nn.functional.normalize``'s eps).
NORM_FLOOR = 1e-12


@dataclass(frozen=True)
class ChainFit:
    weights: list[np.ndarray]
    biases: list[np.ndarray]
    #: Held-out error (mean square relative to the target's) before and after.
    error_before: float
    error_after: float
    steps: int


@dataclass(frozen=True)
class PairFit:
    first: ChainFit
    second: ChainFit


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


def pair_scores(first: np.ndarray, second: np.ndarray, normalized: bool) -> np.ndarray:
    """Every row of ``first`` against every row of ``second``: dot products ``[rows, rows']``, of
    the rows scaled to unit length when ``normalized`` (cosines)."""
    if normalized:
        first, second = _unit_rows(first), _unit_rows(second)
    return first @ second.T


def pair_loss(
    first: np.ndarray, second: np.ndarray, target: np.ndarray, normalized: bool, scale: float
) -> tuple[float, np.ndarray, np.ndarray]:
    """``mean((pair_scores(first, second) - target)²) / scale`` and its gradients with respect to
    ``first`` and ``second``."""
    if normalized:
        norm_a = np.maximum(np.linalg.norm(first, axis=1, keepdims=True), NORM_FLOOR)
        norm_b = np.maximum(np.linalg.norm(second, axis=1, keepdims=True), NORM_FLOOR)
        unit_a, unit_b = first / norm_a, second / norm_b
    else:
        unit_a, unit_b = first, second
    residual = unit_a @ unit_b.T - target
    grad = 2.0 * residual / (residual.size * scale)
    grad_a, grad_b = grad @ unit_b, grad.T @ unit_a
    if normalized:
        # Through x / |x|: the gradient's component along the row drops out.
        grad_a = (grad_a - unit_a * np.sum(grad_a * unit_a, axis=1, keepdims=True)) / norm_a
        grad_b = (grad_b - unit_b * np.sum(grad_b * unit_b, axis=1, keepdims=True)) / norm_b
    return float(np.mean(residual**2) / scale), grad_a, grad_b


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), NORM_FLOOR)


class _Chain:
    """One chain's float32 parameters, their masks (zeros stay zero) and Adam's moments."""

    def __init__(self, weights: list[np.ndarray], biases: list[np.ndarray], biased: list[bool] | None) -> None:
        self.weights = [np.array(w, dtype=np.float32) for w in weights]
        self.biases = [np.array(b, dtype=np.float32) for b in biases]
        self.masks = [w != 0 for w in self.weights]
        self.bias_steps = [1.0 if has else 0.0 for has in (biased or [True] * len(biases))]
        self.params = [*self.weights, *self.biases]
        self.first = [np.zeros_like(p) for p in self.params]
        self.second = [np.zeros_like(p) for p in self.params]

    def forward(self, x: np.ndarray) -> list[np.ndarray]:
        return chain_forward(self.weights, self.biases, x)

    def step(self, activations: list[np.ndarray], grad: np.ndarray, step: int) -> None:
        """One Adam step from the gradient ``grad`` of the loss with respect to the chain's output."""
        grads_w: list[np.ndarray] = [np.empty(0)] * len(self.weights)
        grads_b: list[np.ndarray] = [np.empty(0)] * len(self.biases)
        for index in range(len(self.weights) - 1, -1, -1):
            grads_w[index] = activations[index].T @ grad * self.masks[index]
            grads_b[index] = grad.sum(axis=0) * self.bias_steps[index]
            if index:
                grad = (grad @ self.weights[index].T) * (activations[index] > 0)
        for k, (param, gradient) in enumerate(zip(self.params, [*grads_w, *grads_b], strict=True)):
            self.first[k] = BETAS[0] * self.first[k] + (1 - BETAS[0]) * gradient
            self.second[k] = BETAS[1] * self.second[k] + (1 - BETAS[1]) * gradient * gradient
            corrected = self.first[k] / (1 - BETAS[0] ** step)
            param -= LEARNING_RATE * corrected / (np.sqrt(self.second[k] / (1 - BETAS[1] ** step)) + 1e-12)
        for weight, mask in zip(self.weights, self.masks, strict=True):
            weight *= mask

    def snapshot(self) -> list[np.ndarray]:
        return [p.copy() for p in self.params]

    def fit(self, params: list[np.ndarray], before: float, after: float, steps: int) -> ChainFit:
        tuned = len(self.weights)
        return ChainFit(params[:tuned], params[tuned:], before, after, steps)


def _split(rows: int, held_out: float, judged: int | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Held-out and training row indices; the held-out ones come from the first ``judged`` rows
    (the real ones, before any mixed rows) when given."""
    judged = rows if judged is None else min(judged, rows)
    order = rng.permutation(judged)
    count = max(1, int(judged * held_out))
    return order[:count], np.concatenate([order[count:], np.arange(judged, rows)])


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
    check, train = _split(len(x), held_out, None, rng)
    chain = _Chain(weights, biases, biased)
    scale = max(float(np.mean(y[train] ** 2)), 1e-30)
    best = before = _relative_error(chain.weights, chain.biases, x[check], y[check])
    best_params = chain.snapshot()
    for step in range(1, steps + 1):
        rows = train[rng.integers(0, len(train), size=min(MINIBATCH, len(train)))]
        activations = chain.forward(x[rows])
        chain.step(activations, 2.0 * (activations[-1] - y[rows]) / (activations[-1].size * scale), step)
        if step % CHECK_EVERY == 0:
            error = _relative_error(chain.weights, chain.biases, x[check], y[check])
            if error < best:
                best, best_params = error, chain.snapshot()
    return chain.fit(best_params, before, best, steps)


def tune_pair(
    inputs: tuple[np.ndarray, np.ndarray],
    targets: tuple[np.ndarray, np.ndarray],
    chains: tuple[tuple[list[np.ndarray], list[np.ndarray]], tuple[list[np.ndarray], list[np.ndarray]]],
    steps: int,
    normalized: bool,
    biased: tuple[list[bool] | None, list[bool] | None] = (None, None),
    judged_rows: int | None = None,
    held_out: float = 0.125,
    seed: int = 0,
) -> PairFit:
    """Tune two chains whose outputs the model reads only through their dot product (of unit rows
    when ``normalized``) so that every pair of rows gets the original product.

    ``inputs`` are the two chains' inputs on the same rows as the pruned model computes them,
    ``targets`` the original chains' outputs there, ``chains`` each chain's ``(weights, biases)``.
    Rows are held out from the first ``judged_rows`` (the real calibration rows, when mixed rows
    follow them) and the error is the held-out rows' products against each other, relative to
    their mean square. Returns both chains at the least held-out error seen.
    """
    xa, xb = (np.asarray(x, dtype=np.float32) for x in inputs)
    ya, yb = (np.asarray(y, dtype=np.float32) for y in targets)
    rng = np.random.default_rng(seed)
    check, train = _split(len(xa), held_out, judged_rows, rng)
    first = _Chain(*chains[0], biased[0])
    second = _Chain(*chains[1], biased[1])
    if normalized:
        ya, yb = _unit_rows(ya), _unit_rows(yb)
    target_check = ya[check] @ yb[check].T
    scale = max(float(np.mean((ya[train[:MINIBATCH]] @ yb[train[-MINIBATCH:]].T) ** 2)), 1e-30)

    def error() -> float:
        scores = pair_scores(first.forward(xa[check])[-1], second.forward(xb[check])[-1], normalized)
        return float(np.mean((scores - target_check) ** 2) / max(float(np.mean(target_check**2)), 1e-30))

    best = before = error()
    best_params = (first.snapshot(), second.snapshot())
    for step in range(1, steps + 1):
        rows_a = train[rng.integers(0, len(train), size=min(MINIBATCH, len(train)))]
        rows_b = train[rng.integers(0, len(train), size=min(MINIBATCH, len(train)))]
        acts_a, acts_b = first.forward(xa[rows_a]), second.forward(xb[rows_b])
        _, grad_a, grad_b = pair_loss(acts_a[-1], acts_b[-1], ya[rows_a] @ yb[rows_b].T, normalized, scale)
        first.step(acts_a, grad_a, step)
        second.step(acts_b, grad_b, step)
        if step % CHECK_EVERY == 0:
            measured = error()
            if measured < best:
                best, best_params = measured, (first.snapshot(), second.snapshot())
    return PairFit(first.fit(best_params[0], before, best, steps), second.fit(best_params[1], before, best, steps))
