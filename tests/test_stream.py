"""Streaming a model layer by layer from its checkpoint, resuming after a crash, and the bad inputs
of both: a streamed run writes the same bytes as a run on the model loaded whole, a killed run
resumes to a byte-identical checkpoint, and damaged inputs are named in one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from compress.api import run
from compress.calib.data import CalibConfig
from compress.errors import CompressError

from .conftest import STORIES

pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason="needs ../shared/models/stories260k (its tokenizer)")

TEXT = " ".join(f"Once upon a time there was a little {w} who liked to play in the {p}." for w in ("cat", "dog", "girl", "boy") for p in ("park", "garden", "house")) * 8
RECIPE = ["gptq:bits=4,group=16"]


def make_model(root: Path, layers: int = 4, hidden: int = 64, intermediate: int = 128, shard: str | None = None, tied: bool = False) -> Path:
    """A random Llama with the stories260k tokenizer, saved (sharded when ``shard`` is a size)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.for_model(
        "llama", vocab_size=512, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root, max_shard_size=shard or "2GB")
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(root)
    return root


@pytest.fixture
def calib(tmp_path: Path) -> CalibConfig:
    p = tmp_path / "calib.txt"
    p.write_text(TEXT)
    return CalibConfig(source=str(p), samples=4, seqlen=32, batch_size=2)


def _files(d: Path) -> dict[str, bytes]:
    """The checkpoint's files that must not depend on how the run went (the report holds timings)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith("report")}


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_streamed_run_writes_the_bytes_of_a_whole_model_run(tmp_path: Path, calib: CalibConfig, shard: str | None) -> None:
    src = make_model(tmp_path / "m", shard=shard, tied=shard is None)
    a = run(src, RECIPE, tmp_path / "a", calib=calib, stream="on")
    b = run(src, RECIPE, tmp_path / "b", calib=calib, stream="off")
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa["model.safetensors"] == fb["model.safetensors"]
    ma, mb = json.loads(fa["manifest.json"]), json.loads(fb["manifest.json"])
    for m in (ma, mb):
        m["source"].pop("fingerprint")
    assert ma == mb
    assert a.params_after == b.params_after and a.bytes_after == b.bytes_after
    assert a.model["streamed"] and not (tmp_path / "a.partial").exists()


def test_streamed_load_equals_eager_load(tmp_path: Path) -> None:
    from compress.adapters import get_adapter
    from compress.models import load_model, open_streamed

    src = make_model(tmp_path / "m", shard="30KB")
    assert (src / "model.safetensors.index.json").is_file()
    sm, _tok, _info = open_streamed(src)
    sm.load_outside()
    for i, layer in enumerate(get_adapter(sm.model).layers(sm.model)):
        sm.load_layer(i, layer)
    ref, _, _ = load_model(src)
    ids = torch.randint(0, 512, (2, 16))
    assert torch.equal(ref(ids).logits, sm.model(ids).logits)


def test_checkpoint_is_sharded_per_layer_when_larger_than_a_shard(tmp_path: Path, calib: CalibConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.stream.writer as writer
    from compress.api import load

    src = make_model(tmp_path / "m")
    monkeypatch.setattr(writer, "SHARD_BYTES", 10_000)
    run(src, RECIPE, tmp_path / "a", calib=calib, stream="on")
    out = tmp_path / "a"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 5  # the rest + one per layer
    monkeypatch.undo()
    run(src, RECIPE, tmp_path / "b", calib=calib, stream="off")
    m_a, _ = load(out)
    m_b, _ = load(tmp_path / "b")
    ids = torch.randint(0, 512, (1, 16))
    assert torch.equal(m_a(ids).logits, m_b(ids).logits)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from compress.api import run
    from compress.calib.data import CalibConfig
    src, out, calib, k, recipe = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    def on_layer(i, n, s):
        if i == k:
            os.kill(os.getpid(), signal.SIGKILL)
    run(src, [recipe], out, calib=CalibConfig(source=calib, samples=4, seqlen=32, batch_size=2), stream="on", on_layer=on_layer)
    """
)


def _killed_run(tmp_path: Path, src: Path, out: Path, calib: CalibConfig, k: int, recipe: str = RECIPE[0]) -> None:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    p = subprocess.run([sys.executable, str(script), str(src), str(out), calib.source, str(k), recipe], capture_output=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]


def test_killed_run_resumes_to_a_byte_identical_checkpoint(tmp_path: Path, calib: CalibConfig) -> None:
    src = make_model(tmp_path / "m")
    k = int(torch.randint(0, 3, ()).item())
    _killed_run(tmp_path, src, tmp_path / "a", calib, k)
    partial = tmp_path / "a.partial"
    assert json.loads((partial / "state.json").read_text())["done"] == k + 1
    assert not (tmp_path / "a").exists()
    stages: list[str] = []
    run(src, RECIPE, tmp_path / "a", calib=calib, stream="on", on_stage=stages.append)
    assert any(s.startswith(f"resuming at layer {k + 2} of 4") for s in stages)
    run(src, RECIPE, tmp_path / "b", calib=calib, stream="on")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert len({r["layer"] for r in report["layers"]}) == 4 and len(report["layers"]) == 4 * 7


def test_a_different_recipe_refuses_to_resume_and_restart_discards(tmp_path: Path, calib: CalibConfig) -> None:
    src = make_model(tmp_path / "m")
    _killed_run(tmp_path, src, tmp_path / "a", calib, 1)
    with pytest.raises(CompressError, match=r"different run \(recipe changed\).*--restart"):
        run(src, ["rtn:bits=4,group=16"], tmp_path / "a", calib=calib, stream="on")
    with pytest.raises(CompressError, match=r"calibration changed"):
        run(src, RECIPE, tmp_path / "a", calib=CalibConfig(source=calib.source, samples=4, seqlen=32, batch_size=2, seed=1), stream="on")
    stages: list[str] = []
    run(src, ["rtn:bits=4,group=16"], tmp_path / "a", calib=calib, stream="on", restart=True, on_stage=stages.append)
    assert not any("resuming" in s for s in stages)
    assert (tmp_path / "a" / "manifest.json").is_file()


def test_ctrl_c_says_how_to_resume(tmp_path: Path, calib: CalibConfig) -> None:
    src = make_model(tmp_path / "m")

    def interrupt(i: int, n: int, s: float) -> None:
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(CompressError, match=r"interrupted at layer 3 of 4; the 2 finished layers are kept in .*rerun the same command to resume"):
        run(src, RECIPE, tmp_path / "a", calib=calib, stream="on", on_layer=interrupt)
    run(src, RECIPE, tmp_path / "a", calib=calib, stream="on")
    run(src, RECIPE, tmp_path / "b", calib=calib, stream="on")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_disk_full_keeps_a_resumable_state(tmp_path: Path, calib: CalibConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.stream.progress as progress

    src = make_model(tmp_path / "m")
    real = progress.save_file
    calls = {"n": 0}

    def full(tensors: Any, path: str, metadata: Any = None) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(progress, "save_file", full)
    with pytest.raises(CompressError, match=r"disk full while writing .*layer-00002.*(space|MiB more) .*rerun the same command to resume"):
        run(src, RECIPE, tmp_path / "a", calib=calib, stream="on")
    assert not list((tmp_path / "a.partial").glob(".*.tmp"))
    monkeypatch.undo()
    stages: list[str] = []
    run(src, RECIPE, tmp_path / "a", calib=calib, stream="on", on_stage=stages.append)
    assert any(s.startswith("resuming at layer 3 of 4") for s in stages)


def test_truncated_and_missing_shards_are_named(tmp_path: Path, calib: CalibConfig) -> None:
    src = make_model(tmp_path / "m", shard="30KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    data = (src / victim).read_bytes()
    (src / victim).write_bytes(data[: len(data) - 100])
    with pytest.raises(CompressError, match=rf"weight file '.*{victim}' is truncated: tensor '.*' ends at byte"):
        run(src, RECIPE, tmp_path / "a", calib=calib, stream="on")
    (src / victim).unlink()
    with pytest.raises(CompressError, match=rf"points to '{victim}', which is missing"):
        run(src, RECIPE, tmp_path / "a", calib=calib, stream="on")
    assert not (tmp_path / "a").exists()


def test_offload_dir_and_stream_option_errors(tmp_path: Path, calib: CalibConfig) -> None:
    src = make_model(tmp_path / "m")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if os.access(ro, os.W_OK):  # running as root: permissions do not bind
        bad = tmp_path / "file"
        bad.write_text("")
        ro = bad / "sub"
    with pytest.raises(CompressError, match="--offload-dir .* is not writable"):
        run(src, RECIPE, tmp_path / "a", calib=calib, offload_dir=ro)
    with pytest.raises(CompressError, match="--stream is not possible: lord reads every layer"):
        run(src, ["lord:ratio=0.2"], tmp_path / "a", calib=calib, stream="on")
    run(src, RECIPE, tmp_path / "a", calib=calib, stream="on", offload_dir=tmp_path / "acts")
    run(src, RECIPE, tmp_path / "b", calib=calib, stream="on")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert not list((tmp_path / "acts").iterdir())


RSS = textwrap.dedent(
    """
    import os, resource, sys, threading, time, torch
    from compress.api import run
    from compress.calib.data import CalibConfig
    torch.set_num_threads(1)
    # Some kernels (sandboxes) do not keep ru_maxrss: sample the resident size as well.
    peak, stop = [0], threading.Event()
    def sample():
        page = os.sysconf("SC_PAGE_SIZE") // 1024
        while not stop.is_set():
            with open("/proc/self/statm") as f:
                peak[0] = max(peak[0], int(f.read().split()[1]) * page)
            time.sleep(0.002)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    calib = CalibConfig(source=sys.argv[4], samples=4, seqlen=32, batch_size=2)
    run(sys.argv[1], ["gptq:bits=4,group=64"], sys.argv[2], calib=calib, stream=sys.argv[3])
    stop.set()
    t.join()
    print(max(peak[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    """
)


@pytest.mark.slow
def test_peak_memory_grows_with_one_layer_not_with_depth(tmp_path: Path, calib: CalibConfig) -> None:
    script = tmp_path / "rss.py"
    script.write_text(RSS)

    def peak(layers: int, mode: str) -> int:
        src = tmp_path / f"m{layers}"
        if not src.exists():
            make_model(src, layers=layers, hidden=512, intermediate=1536)
        out = tmp_path / f"o{layers}{mode}"
        p = subprocess.run([sys.executable, str(script), str(src), str(out), mode, calib.source], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        shutil.rmtree(out)
        return int(p.stdout.split()[-1]) * 1024

    per_layer = (4 * 512 * 512 * 3 // 4 + 3 * 512 * 1536) * 4  # GQA attention + MLP, float32
    grow_stream = peak(16, "on") - peak(2, "on")
    grow_eager = peak(16, "off") - peak(2, "off")
    print(f"growth 2 -> 16 layers: streamed {grow_stream / 2**20:.1f} MiB, whole {grow_eager / 2**20:.1f} MiB, one layer {per_layer / 2**20:.1f} MiB")
    if grow_eager <= 10 * per_layer:  # the control: a whole load of 14 more layers must show
        pytest.skip(f"this OS does not report the resident size (whole-model growth {grow_eager} B)")
    assert grow_stream < max(4 * per_layer, grow_eager / 4), (grow_stream, grow_eager, per_layer)


def test_a_whole_model_that_does_not_fit_is_refused_before_loading(tmp_path: Path, calib: CalibConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.planning.memory as memory

    src = make_model(tmp_path / "m")
    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    with pytest.raises(CompressError, match=r"whole model must be loaded \(lord reads every layer's weights .*\), but its weights need .* available"):
        run(src, ["lord:ratio=0.2"], tmp_path / "a", calib=calib)
    with pytest.raises(CompressError, match=r"--no-stream was given.*drop --no-stream"):
        run(src, RECIPE, tmp_path / "a", calib=calib, stream="off")
    run(src, RECIPE, tmp_path / "a", calib=calib)  # streamed: fits


DP = textwrap.dedent(
    """
    import os, signal, sys
    from compress.api import run
    from compress.calib.data import CalibConfig
    src, out, calib, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    def on_layer(i, n, s):
        pass
    if int(os.environ.get("RANK", "0")) == 1 and kill_at >= 0:
        import compress.stream as stream
        done = stream.LayerStream.done
        def dying(self, i, *a, **k):
            r = done(self, i, *a, **k)
            if i == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return r
        stream.LayerStream.done = dying
    run(src, ["gptq:bits=4,group=16"], out, calib=CalibConfig(source=calib, samples=8, seqlen=32, batch_size=2), stream="on")
    """
)


def _torchrun(tmp_path: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "dp.py"
    script.write_text(DP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", env["MASTER_PORT"], str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_two_gloo_processes_match_one_and_a_dying_rank_leaves_a_resumable_state(tmp_path: Path, calib: CalibConfig) -> None:
    src = make_model(tmp_path / "m")
    one = _torchrun(tmp_path, 1, str(src), str(tmp_path / "one"), calib.source, "-1")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun(tmp_path, 2, str(src), str(tmp_path / "two"), calib.source, "1")
    assert two.returncode != 0 and not (tmp_path / "two").exists()
    state = json.loads((tmp_path / "two.partial" / "state.json").read_text())
    assert state["done"] >= 1 and state["fingerprint"]["processes"] == 2
    again = _torchrun(tmp_path, 2, str(src), str(tmp_path / "two"), calib.source, "-1")
    assert again.returncode == 0, again.stderr[-2000:]
    assert _files(tmp_path / "one")["model.safetensors"] == _files(tmp_path / "two")["model.safetensors"]


def test_passes_that_read_raw_inputs_are_refused_in_a_data_parallel_run() -> None:
    from compress.pipeline.distributed import Dist, check_passes
    from compress.recipe import parse_shorthand
    from compress.registry import get_pass

    def passes(*texts: str) -> list[Any]:
        return [get_pass(s.name)(s.config) for s in map(parse_shorthand, texts)]

    d = Dist(0, 2, torch.device("cpu"))
    check_passes(passes("gptq:bits=4", "svd-llm:ratio=0.2", "wanda:pattern=2:4"), d)
    with pytest.raises(CompressError, match="slicegpt reads the layer's calibration inputs .* run it in one process"):
        check_passes(passes("slicegpt:sparsity=0.25"), d)
    with pytest.raises(CompressError, match="gptq reads the layer's calibration inputs"):
        check_passes(passes("gptq:bits=3,dim=ada"), d)


def test_a_second_run_on_the_same_output_is_refused_while_the_first_works(tmp_path: Path) -> None:
    from compress.stream import Progress

    first = Progress(tmp_path / "a", {"recipe": 1})
    with pytest.raises(CompressError, match="another run is writing .*a.partial"):
        Progress(tmp_path / "a", {"recipe": 1})
    first.remove()
    Progress(tmp_path / "a", {"recipe": 1}).remove()


@pytest.mark.slow
def test_gguf_streamed_equals_whole(tmp_path: Path) -> None:
    from .conftest import SMOLLM

    if not SMOLLM.is_dir():
        pytest.skip("needs ../shared/models/smollm2-135m-instruct-q4_1-gguf")
    pytest.importorskip("gguf")
    a = run(SMOLLM, ["rtn:bits=4,group=64"], tmp_path / "a", stream="on")
    run(SMOLLM, ["rtn:bits=4,group=64"], tmp_path / "b", stream="off")
    assert a.model["streamed"]
    assert _files(tmp_path / "a")["model.safetensors"] == _files(tmp_path / "b")["model.safetensors"]


def test_a_stop_between_the_next_inputs_and_the_progress_record_resumes_exactly(tmp_path: Path, calib: CalibConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    from compress.stream import Progress

    src = make_model(tmp_path / "m")
    real = Progress._write_state

    def stop(self: Progress, n_layers: int) -> None:
        if self.done == 2:  # layer 1 and the inputs of layer 2 are on disk, the record still says 1
            raise KeyboardInterrupt
        real(self, n_layers)

    monkeypatch.setattr(Progress, "_write_state", stop)
    with pytest.raises(CompressError, match="interrupted"):
        run(src, RECIPE, tmp_path / "a", calib=calib, stream="on")
    monkeypatch.undo()
    assert json.loads((tmp_path / "a.partial" / "state.json").read_text())["done"] == 1
    run(src, RECIPE, tmp_path / "a", calib=calib, stream="on")
    run(src, RECIPE, tmp_path / "b", calib=calib, stream="on")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_a_released_layer_keeps_no_dense_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPRESS_DENSE_CACHE", "1")  # caches kept outside compress's own loops
    from compress.recipe import parse_shorthand
    from compress.registry import get_pass
    from compress.stream import release

    spec = parse_shorthand("rtn:bits=4,group=16")
    layer = torch.nn.Sequential(torch.nn.Linear(32, 16))
    q = get_pass(spec.name)(spec.config).apply("0", layer[0], None, None).module
    layer[0] = q
    layer(torch.randn(2, 32))
    assert any("_dense_cache" in m.__dict__ or "_kernel_layout" in m.__dict__ for m in layer.modules())
    release(layer)
    assert not any("_dense_cache" in m.__dict__ or "_kernel_layout" in m.__dict__ for m in layer.modules())
    assert all(t.device.type == "meta" for t in layer.state_dict().values())


def test_checkpoints_that_cannot_stream_fall_back_or_refuse(tmp_path: Path, calib: CalibConfig) -> None:
    from safetensors.torch import load_file, save_file

    src = make_model(tmp_path / "m")
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.weight_scale"] = torch.ones(1)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CompressError, match=r"tensors the model does not take .*weight_scale.*--no-stream"):
        run(src, RECIPE, tmp_path / "a", calib=calib, stream="on")
    stages: list[str] = []
    run(src, RECIPE, tmp_path / "a", calib=calib, on_stage=stages.append)  # auto: loaded whole
    assert any("cannot be streamed" in s for s in stages)


def test_config_and_checkpoint_shapes_that_disagree_are_named_before_any_layer(tmp_path: Path, calib: CalibConfig) -> None:
    src = make_model(tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CompressError, match=r"checkpoint tensor '.*mlp.*' has shape .* expects .* disagree"):
        run(src, RECIPE, tmp_path / "a", calib=calib, stream="on")
    assert not (tmp_path / "a.partial").exists() or not list((tmp_path / "a.partial").glob("layer-*"))


def test_restart_cannot_pull_the_directory_from_under_a_running_job(tmp_path: Path) -> None:
    from compress.stream import Progress

    first = Progress(tmp_path / "a", {"recipe": 1})
    with pytest.raises(CompressError, match="another run is writing"):
        Progress(tmp_path / "a", {"recipe": 2}, restart=True)
    assert (tmp_path / "a.partial" / "state.json").is_file()
    first.release()


def test_a_run_killed_before_its_first_layer_finished_starts_afresh(tmp_path: Path, calib: CalibConfig) -> None:
    src = make_model(tmp_path / "m")
    partial = tmp_path / "a.partial"
    partial.mkdir()
    (partial / "layer-00000.safetensors").write_bytes(b"half")
    (partial / ".layer-00000.json.tmp").write_text("{")
    run(src, RECIPE, tmp_path / "a", calib=calib, stream="on")
    run(src, RECIPE, tmp_path / "b", calib=calib, stream="on")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_cli_stream_flags(tmp_path: Path, calib: CalibConfig) -> None:
    from .test_cli import _assert_one_line_error, _run

    src = make_model(tmp_path / "m")
    base = ["run", str(src), "--pass", RECIPE[0], "--calib", calib.source, "--calib-samples", "4", "--calib-seqlen", "32"]
    p = _run(*base, "--out", str(tmp_path / "a"), "--no-stream", "--offload-dir", str(tmp_path / "acts"))
    _assert_one_line_error(p, "--offload-dir needs a streamed run")
    p = _run("run", str(src), "--pass", "lord:ratio=0.2", "--calib", calib.source, "--out", str(tmp_path / "a"), "--stream")
    _assert_one_line_error(p, "--stream is not possible: lord")
    p = _run(*base, "--out", str(tmp_path / "a"), "--stream", "-q")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "a" / "manifest.json").is_file() and not (tmp_path / "a.partial").exists()
