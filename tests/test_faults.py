"""Faults around the files: hostile external data, and writes that are interrupted or fail.

tests/test_io.py checks the load policy function by function; here every case goes through the
command line and also checks what is left on disk: no OUT, no OUT.data, no staging folder, the
input and its data byte for byte, and a previous OUT untouched.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import onnx
import pytest
from conftest import MODELS, REPO, files_in
from fuzzing import Outcome, run_cli

from onnxcompress import io

DLRM = MODELS / "dlrm.onnx"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (following nothing), by relative path."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


def external_dlrm(folder: Path, name: str = "model.onnx", location: str | None = None) -> Path:
    """The shipped DLRM saved into ``folder`` with every tensor in one external-data file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(
        onnx.load(str(DLRM)),
        str(path),
        save_as_external_data=True,
        location=location or name + ".data",
        size_threshold=0,
    )
    return path


def set_location(model_path: Path, location: str, tensor_name: str | None = None) -> None:
    """Point every external tensor (or one) at ``location``, keeping offsets and lengths."""
    proto = onnx.load(str(model_path), load_external_data=False)
    for tensor in proto.graph.initializer:
        if tensor_name is not None and tensor.name != tensor_name:
            continue
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    model_path.write_bytes(proto.SerializeToString())


def assert_refused(
    outcome: Outcome, code: int, message: str, out: Path, before: dict[str, bytes], inputs: Path
) -> None:
    assert not outcome.crash, outcome.crash
    assert outcome.code == code, outcome.err
    assert outcome.err.strip().splitlines() == outcome.error_lines, outcome.err
    assert len(outcome.error_lines) == 1
    assert message in outcome.error_lines[0], outcome.error_lines[0]
    assert not out.exists() and not io.data_file_for(out).exists()
    assert not list(out.parent.glob(io.STAGING_PREFIX + "*"))
    assert snapshot(inputs) == before


# ---- external data that escapes, is missing or is short ---------------------------------------------


def outside_folder(tmp_path: Path) -> Path:
    """A copy of the model's data outside the model's folder: a real target for an escape."""
    outside = tmp_path / "outside"
    external_dlrm(outside)
    return outside / "model.onnx.data"


@pytest.mark.parametrize(
    ("make_location", "message"),
    [
        (lambda tmp: "../outside/model.onnx.data", "points outside the model's folder ('../outside/model.onnx.data')"),
        (lambda tmp: "weights/../../outside/model.onnx.data", "points outside the model's folder"),
        (lambda tmp: "../../../../../../../../etc/passwd", "points outside the model's folder"),
        (lambda tmp: "/etc/passwd", "points to the absolute path '/etc/passwd'"),
        (lambda tmp: str(tmp / "outside" / "model.onnx.data"), "points to the absolute path"),
        # Absolute even when it names the model's own data file: the policy is relative paths only.
        (lambda tmp: str(tmp / "in" / "model.onnx.data"), "points to the absolute path"),
    ],
    ids=["parent", "parent-via-subfolder", "etc-passwd-relative", "etc-passwd", "absolute-outside", "absolute-inside"],
)
def test_external_data_outside_the_folder_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], make_location, message: str
) -> None:
    outside_folder(tmp_path)
    source = external_dlrm(tmp_path / "in")
    set_location(source, make_location(tmp_path), tensor_name="top.0.weight")
    before = snapshot(tmp_path / "in")
    out = tmp_path / "out.onnx"
    outcome = run_cli(capfd, source, out, "--passes", "cleanup,quant")
    assert_refused(outcome, 2, message, out, before, tmp_path / "in")
    assert "top.0.weight" in outcome.error_lines[0]


def test_a_symlinked_data_file_leaving_the_folder_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    target = outside_folder(tmp_path)
    source = external_dlrm(tmp_path / "in")
    data = tmp_path / "in" / "model.onnx.data"
    data.unlink()
    data.symlink_to(target)
    before = snapshot(tmp_path / "in")
    out = tmp_path / "out.onnx"
    outcome = run_cli(capfd, source, out, "--passes", "cleanup")
    assert_refused(outcome, 2, "is a link that leaves the model's folder", out, before, tmp_path / "in")


def test_a_symlinked_subfolder_leaving_the_folder_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The location looks local ('weights/model.onnx.data'), but 'weights' is a link out of the folder."""
    target = outside_folder(tmp_path)
    source = external_dlrm(tmp_path / "in")
    (tmp_path / "in" / "model.onnx.data").unlink()
    (tmp_path / "in" / "weights").symlink_to(target.parent, target_is_directory=True)
    set_location(source, "weights/model.onnx.data")
    before = snapshot(tmp_path / "in")
    out = tmp_path / "out.onnx"
    outcome = run_cli(capfd, source, out, "--passes", "cleanup")
    assert_refused(outcome, 2, "is a link that leaves the model's folder", out, before, tmp_path / "in")


def test_a_symlink_even_inside_the_folder_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The ONNX checker refuses any symlinked data file, even one that resolves inside the folder."""
    source = external_dlrm(tmp_path / "in")
    (tmp_path / "in" / "weights").mkdir()
    (tmp_path / "in" / "model.onnx.data").rename(tmp_path / "in" / "weights" / "real.data")
    (tmp_path / "in" / "model.onnx.data").symlink_to(tmp_path / "in" / "weights" / "real.data")
    before = snapshot(tmp_path / "in")
    out = tmp_path / "out.onnx"
    outcome = run_cli(capfd, source, out, "--passes", "cleanup")
    assert_refused(outcome, 2, "is a symbolic link", out, before, tmp_path / "in")


def test_a_hard_linked_data_file_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A hard link can pull any file of the same file system into the folder; the checker refuses it."""
    source = external_dlrm(tmp_path / "in")
    os.link(tmp_path / "in" / "model.onnx.data", tmp_path / "elsewhere.data")
    before = snapshot(tmp_path / "in")
    out = tmp_path / "out.onnx"
    outcome = run_cli(capfd, source, out, "--passes", "cleanup")
    assert_refused(outcome, 2, "multiple hard links", out, before, tmp_path / "in")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data.unlink(), "external data file 'model.onnx.data' (tensor"),
        (lambda data: data.write_bytes(b""), "has 0 bytes but tensor"),
        (
            lambda data: data.write_bytes(data.read_bytes()[:-1]),
            "the data file is truncated or belongs to another model",
        ),
        (lambda data: data.write_bytes(data.read_bytes()[: len(data.read_bytes()) // 2]), "the data file is truncated"),
        (lambda data: (data.unlink(), data.mkdir()), "is missing; copy it next to the model"),
    ],
    ids=["missing", "empty", "one-byte-short", "half", "a-folder"],
)
def test_missing_or_short_data_gives_a_clear_error(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], damage, message: str
) -> None:
    source = external_dlrm(tmp_path / "in")
    damage(tmp_path / "in" / "model.onnx.data")
    before = snapshot(tmp_path / "in")
    out = tmp_path / "out.onnx"
    outcome = run_cli(capfd, source, out, "--passes", "cleanup,quant")
    assert_refused(outcome, 2, message, out, before, tmp_path / "in")


# ---- OUT must never overwrite the input's data ----------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "out_name"),
    [
        ("small.onnx.data", "small.onnx"),  # OUT.data would be exactly the input's data file
        ("model.onnx.data", "model.onnx.data"),  # OUT is the input's data file
    ],
    ids=["out-data-is-input-data", "out-is-input-data"],
)
def test_out_whose_data_would_overwrite_the_input_data_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], location: str, out_name: str
) -> None:
    source = external_dlrm(tmp_path / "in", location=location)
    before = snapshot(tmp_path / "in")
    out = tmp_path / "in" / out_name
    outcome = run_cli(capfd, source, out, "--passes", "cleanup")
    assert outcome.code == 2, outcome.err
    assert f"would overwrite the input's external data {location}" in outcome.error_lines[0]
    assert snapshot(tmp_path / "in") == before
    assert not list((tmp_path / "in").glob(io.STAGING_PREFIX + "*"))


@pytest.mark.parametrize("spelling", ["symlinked-folder", "dot-dot", "symlinked-out"])
def test_the_same_refusal_through_another_spelling_of_the_path(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], spelling: str
) -> None:
    source = external_dlrm(tmp_path / "in", location="small.onnx.data")
    before = snapshot(tmp_path / "in")
    if spelling == "symlinked-folder":
        (tmp_path / "alias").symlink_to(tmp_path / "in", target_is_directory=True)
        out = tmp_path / "alias" / "small.onnx"
    elif spelling == "dot-dot":
        (tmp_path / "other").mkdir()
        out = tmp_path / "other" / ".." / "in" / "small.onnx"
    else:  # OUT is a link to the input's data file
        (tmp_path / "out").mkdir()
        out = tmp_path / "out" / "small.onnx"
        out.symlink_to(tmp_path / "in" / "small.onnx.data")
    outcome = run_cli(capfd, source, out, "--passes", "cleanup")
    assert outcome.code == 2, outcome.err
    assert "would overwrite the input's external data small.onnx.data" in outcome.error_lines[0]
    assert snapshot(tmp_path / "in") == before


def test_a_symlinked_out_data_that_out_does_not_own_is_refused_and_neither_file_touched(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """OUT.data is a link to the input's data and no OUT references it: replacing the link could
    break another model that reads through it, so the run is refused before any work."""
    source = external_dlrm(tmp_path / "in")
    before = snapshot(tmp_path / "in")
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "small.onnx"
    io.data_file_for(out).symlink_to(tmp_path / "in" / "model.onnx.data")
    outcome = run_cli(capfd, source, out, "--passes", "cleanup")
    assert outcome.code == 2, outcome.err
    assert "is not OUT's own external data" in outcome.err
    assert io.data_file_for(out).is_symlink() and not out.exists()
    assert snapshot(tmp_path / "in") == before


# ---- a model with external data through the data-driven passes ------------------------------------------


def test_quant_runs_on_a_model_whose_small_tensors_are_external(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Activation capture serialized the model for onnxruntime with external tensors under 64 KiB
    still pointing at the data file; onnxruntime refuses external paths in a model given as bytes,
    so every model saved with external data (including onnxcompress's own outputs) failed quant
    with exit 3 'the transformed model: onnxruntime cannot load it'."""
    source = external_dlrm(tmp_path / "in")
    before = snapshot(tmp_path / "in")
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    outcome = run_cli(capfd, source, out, "--passes", "cleanup,quant")
    assert outcome.code == 0, outcome.err
    assert files_in(out.parent) == ["small.onnx", "small.onnx.data"]
    assert snapshot(tmp_path / "in") == before
    again = tmp_path / "again" / "smaller.onnx"
    again.parent.mkdir()
    feeds = MODELS / "dlrm.feeds.npz"
    outcome = run_cli(capfd, out, again, "--passes", "cleanup,quant", "--set", "quant.bits=4", "--feeds", feeds)
    assert outcome.code == 0, outcome.err


@pytest.mark.parametrize("preset", ["int4", "mixed"])
def test_an_external_data_model_is_compressed_from_any_working_directory(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, preset: str
) -> None:
    """The lookup Hessians and the integer-kernel timings copied the model through its proto,
    which drops where external tensors live: run from another folder, int4, mixed and max failed
    with "No such file or directory: 'model.onnx.data'"."""
    source = external_dlrm(tmp_path / "in")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "out.onnx"
    calib = MODELS / "dlrm.calib.npz"
    outcome = run_cli(capfd, source, out, "--preset", preset, "--calib", calib, "--feeds", MODELS / "dlrm.feeds.npz")
    assert outcome.code == 0, outcome.err
    assert out.exists()


# ---- interrupted and failing writes, in a real process -------------------------------------------------

BIG_DATA_BYTES = 2 * 600_000 * 64 * 4  # two 153.6 MB tables: saving takes a visible moment


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic DLRM with about 300 MB of external data (generated in a few seconds)."""
    from make_synthetic_dlrm import SyntheticSpec, make_synthetic_dlrm

    path = make_synthetic_dlrm(tmp_path_factory.mktemp("big"), SyntheticSpec.uniform(tables=2, rows=600_000))
    assert io.data_file_for(path).stat().st_size >= BIG_DATA_BYTES
    return path


def fingerprint(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Size, mtime and the first and last MiB of every file: enough to see any write, cheap on 300 MB."""
    result = {}
    for path in sorted(folder.iterdir()):
        with path.open("rb") as handle:
            head = handle.read(1 << 20)
            handle.seek(max(path.stat().st_size - (1 << 20), 0))
            tail = handle.read()
        result[path.name] = (path.stat().st_size, path.stat().st_mtime_ns, head + tail)
    return result


def previous_out(folder: Path) -> Path:
    """A previous OUT and its data file, which a failed or interrupted run must leave as they are."""
    return external_dlrm(folder, name="small.onnx")


def command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "onnxcompress", *(str(arg) for arg in args)]


def staging_folders(folder: Path) -> list[Path]:
    return sorted(folder.glob(io.STAGING_PREFIX + "*"))


def wait_for(process: subprocess.Popen[str], condition, timeout: float = 60.0) -> bool:
    """Poll ``condition`` every millisecond while the process runs; True once it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(0.001)
    return False


def staged_data_size(out_dir: Path) -> int | None:
    """Size of the data file being written under the staging folder (onnx-ir writes it in a
    temporary subfolder, then moves it up), or None before it exists."""
    for staging in staging_folders(out_dir):
        with contextlib.suppress(FileNotFoundError):
            for data in staging.rglob("small.onnx.data"):
                return data.stat().st_size
    return None


def mid_save(out_dir: Path, total: int):
    def condition() -> bool:
        size = staged_data_size(out_dir)
        return size is not None and 0 < size < total

    return condition


def interruptible() -> None:
    """SIGINT as an interactive shell delivers it: a suite run in the background (``cmd &``) starts
    with SIGINT ignored, which its children inherit, and Python keeps an ignored SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def staged_and_complete(out_dir: Path):
    def condition() -> bool:
        folders = staging_folders(out_dir)
        # The data file reaches the staging folder's top only once written (onnx-ir moves it up).
        return bool(folders) and (folders[0] / "small.onnx").exists() and (folders[0] / "small.onnx.data").exists()

    return condition


@pytest.mark.parametrize("phase", ["saving", "checking-parity"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_write_leaves_nothing_and_keeps_the_previous_out(
    big_model: Path, tmp_path: Path, signum: int, phase: str
) -> None:
    out_dir = tmp_path / "out"
    out = previous_out(out_dir)
    before_out, before_in = fingerprint(out_dir), fingerprint(big_model.parent)
    total = io.data_file_for(big_model).stat().st_size
    # Parity on 100k rows keeps the fully staged files around for a while before the commit.
    args = [
        "--passes",
        "cleanup",
        "--input-shape",
        "ids0=100000",
        "--input-shape",
        "ids1=100000",
        "--input-shape",
        "dense=100000,16",
    ]
    condition = mid_save(out_dir, total) if phase == "saving" else staged_and_complete(out_dir)
    for _attempt in range(3):  # the window is a fraction of a second; a missed one is retried, not passed
        process = subprocess.Popen(
            command(big_model, out, *args),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=interruptible,
        )
        caught = wait_for(process, condition)
        if caught:
            process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
        if caught and process.returncode != 0:
            break
        # Not caught, or the signal landed after the commit (a busy machine polls late): the run
        # completed, so restore the previous OUT and try again.
        assert process.returncode == 0, stderr
        caught = False
        out = previous_out(out_dir)
        before_out = fingerprint(out_dir)
    assert caught, f"never interrupted the run while {phase} in three tries"
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["error: interrupted; nothing was written"]
    assert staging_folders(out_dir) == []
    assert fingerprint(out_dir) == before_out  # neither a partial OUT nor a partial OUT.data
    assert fingerprint(big_model.parent) == before_in
    io.load(out)  # the previous OUT still loads with its data


@pytest.mark.parametrize(
    ("source", "limit", "extra"),
    [
        ("big", 50_000_000, []),  # the external-data file outgrows the limit
        ("dlrm_wide", 1_000_000, ["--external-data", "never"]),  # the single .onnx file does
    ],
    ids=["external-data", "single-file"],
)
def test_a_write_that_runs_out_of_space_fails_cleanly(
    big_model: Path, tmp_path: Path, source: str, limit: int, extra: list[str]
) -> None:
    """RLIMIT_FSIZE stands in for a full disk: the write fails with EFBIG (CPython ignores SIGXFSZ,
    so the process is not killed by it), and the CLI reports it as an output-path error."""
    model = big_model if source == "big" else MODELS / f"{source}.onnx"
    out_dir = tmp_path / "out"
    out = previous_out(out_dir)
    before_out, before_in = fingerprint(out_dir), fingerprint(model.parent)

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    process = subprocess.run(
        command(model, out, "--passes", "cleanup", *extra),
        cwd=REPO,
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        check=False,
        timeout=300,
    )
    assert process.returncode == 2, process.stderr
    assert process.stderr.strip().splitlines() == [
        f"error: {out.resolve()}: writing failed: File too large; free space or choose another output folder"
    ]
    assert staging_folders(out_dir) == []
    assert fingerprint(out_dir) == before_out
    assert fingerprint(model.parent) == before_in


# The signal tests above found this: a signal sent as soon as the staged files appear lands while
# stage() hands its result back, or on the first bytecode after it returns, both outside any
# cleanup, and the staging folder stayed behind (about one run in four). These pin the two spots.


def test_an_interrupt_while_stage_returns_removes_the_staging_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(**_fields: object) -> io.StagedModel:
        raise KeyboardInterrupt  # what a pending SIGINT raises at the next bytecode check

    model = io.load(DLRM)
    monkeypatch.setattr(io, "StagedModel", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.stage(model, tmp_path / "small.onnx")
    assert files_in(tmp_path) == []


def test_an_interrupt_right_after_stage_returns_discards_the_staged_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxcompress import api, compress

    real_stage, real_clock = io.stage, time.perf_counter
    handed_back: list[io.StagedModel] = []
    interrupted: list[bool] = []

    def stage(*args: object, **kwargs: object) -> io.StagedModel:
        handed_back.append(real_stage(*args, **kwargs))  # type: ignore[arg-type]
        return handed_back[-1]

    def interrupting_clock() -> float:
        if handed_back and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt  # the first call after the handoff takes the pending signal
        return real_clock()

    monkeypatch.setattr(api.io, "stage", stage)
    monkeypatch.setattr(api.time, "perf_counter", interrupting_clock)
    with pytest.raises(KeyboardInterrupt):
        compress(DLRM, tmp_path / "small.onnx", ["cleanup"])
    assert interrupted and handed_back
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("sender", ["main thread", "another thread"])
def test_a_signal_held_while_out_is_moved_into_place_says_out_is_complete(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sender: str
) -> None:
    # The commit holds SIGINT/SIGTERM so that OUT and its data stay paired; a signal that came then
    # is delivered once both are in place, and "nothing was written" would be false. The kernel
    # hands a process's signal to any thread that does not block it (onnxruntime's pool threads):
    # with a signal mask on the main thread only, KeyboardInterrupt then broke into the commit
    # before OUT was moved, and the CLI still said OUT was complete (seen in a loaded suite run).
    original = Path.replace
    sent: list[bool] = []
    out = tmp_path / "out.onnx"

    def send() -> None:
        os.kill(os.getpid(), signal.SIGINT)

    def replace(self: Path, target: str | os.PathLike[str]) -> Path:
        if not sent and Path(target) == out:  # the commit's move of OUT into place
            sent.append(True)
            if sender == "main thread":
                send()
            else:
                thread = threading.Thread(target=send)
                thread.start()
                thread.join()
            time.sleep(0.05)  # time for the interpreter to act on the signal mid-commit, had it not been held
        return original(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # also when the suite runs with it ignored
    try:
        result = cli(
            MODELS / "sklearn_mlp.onnx", out, "--passes", "cleanup", "--calib", MODELS / "sklearn_mlp.calib.npz"
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sent and result.code == 130
    assert result.error_lines == [f"error: interrupted after {out} was written; it is complete"]
    io.load(out)
    assert [path.name for path in tmp_path.iterdir()] == ["out.onnx"]  # the staging folder is gone
