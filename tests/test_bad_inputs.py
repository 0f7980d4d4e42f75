"""Bad inputs and faults, one table per class, each fed through the CLI in a subprocess: a non-zero
exit, no traceback, one error line on stderr, nothing complete-looking left behind, and (for
faults) a rerun that finishes byte-identical to an uninterrupted run.

Class 3 (errors name the flags of the command that was run) walks the refusals of every command
in process and looks each flag up in that command's own parser."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from .conftest import DATA_DIR, STORIES

pytestmark = pytest.mark.skipif(not STORIES.is_dir() or not DATA_DIR.is_dir(), reason="needs ../shared (stories260k and data)")

SMALL = ["--calib-samples", "4", "--calib-seqlen", "64"]
EVAL = ["--max-windows", "1", "--ppl-seqlen", "128"]
ENV = {**os.environ, "COMPRESS_DATA_DIR": str(DATA_DIR), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "400"}


def cli(*args: str, cwd: Path, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """``compress ARGS`` in a fresh python (``prelude`` runs first, e.g. to inject a fault)."""
    code = f"import sys\n{prelude}\nfrom compress.cli.main import main\nsys.argv = ['compress', *{list(args)!r}]\nmain()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=cwd, env=ENV)


def error_line(p: subprocess.CompletedProcess[str], match: str, only: bool = True) -> str:
    """The run failed with one error line matching ``match`` (``only``: and nothing else on stderr)."""
    assert p.returncode != 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], p.stderr[-3000:]
    if only:
        assert len(lines) == 1, p.stderr[-3000:]
    assert re.search(match, errors[0]), errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small compressed checkpoint of stories260k."""
    root = tmp_path_factory.mktemp("ckpt")
    p = cli("run", str(STORIES), "--pass", "rtn:bits=4,group=0", "--out", str(root / "c"), "-q", cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    return root / "c"


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.suffix == ".safetensors"}


# --- class 1: every file read is decoded with its errors caught and named --------------------------------------

def _write(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name

    return make


CALIB_FILES = {
    "txt-not-utf8": (_write("c.txt", b"hello \xff\xfe world\n"), r"c.txt' is not UTF-8 text \(byte 6, line 1"),
    "jsonl-not-json": (_write("c.jsonl", b'{"text": "ok"}\nnot json\n'), r"line 2 is not JSON"),
    "jsonl-not-object": (_write("c.jsonl", b'{"text": "ok"}\n[1, 2]\n'), r"line 2 is a JSON list, not an object"),
    "jsonl-null-text": (_write("c.jsonl", b'{"text": "ok"}\n{"text": null}\n'), r"line 2 has a null 'text', not text"),
    "jsonl-not-utf8": (_write("c.jsonl", b'{"text": "ok \xff"}\n'), r"is not UTF-8 text"),
    "jsonl-gz-corrupt": (_write("c.jsonl.gz", b"\x1f\x8bnot really gzip"), r"cannot read calibration file .*c.jsonl.gz"),
    "parquet-corrupt": (_write("c.parquet", b"PAR1garbagegarbage"), r"is not a readable parquet file"),
}


@pytest.mark.parametrize("case", sorted(CALIB_FILES))
def test_calibration_files_that_cannot_be_decoded(tmp_path: Path, case: str) -> None:
    if case.startswith("parquet"):
        pytest.importorskip("pyarrow")
    make, match = CALIB_FILES[case]
    path = make(tmp_path)
    p = cli("run", str(STORIES), "--pass", "gptq:bits=4,group=0", "--calib", str(path), "--out", "o", *SMALL, cwd=tmp_path)
    error_line(p, match)
    assert not (tmp_path / "o").exists()


def test_a_recipe_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_bytes(b"passes:\n  - {pass: rtn, bits: 4, group: 0}\n# \xff\n")
    error_line(cli("run", str(STORIES), "--recipe", "r.yaml", "--out", "o", cwd=tmp_path), r"recipe file 'r.yaml' is not UTF-8 text \(byte \d+, line 3")
    error_line(cli("validate", "r.yaml", cwd=tmp_path), r"is not UTF-8")


def test_empty_calibration_rows_are_not_calibration_data(tmp_path: Path) -> None:
    from compress.calib.data import load_documents

    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n{"text": ""}\n{"text": "  "}\n{"text": "two"}\n')
    assert load_documents(str(tmp_path / "c.jsonl")) == ["one", "two"]


CHECKPOINT_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "format-version-not-int": (
        lambda d: _edit_config(d, lambda c: c["quantization_config"].update(format_version="abc")),
        r"'format_version' must be an integer, got 'abc'"),
    "truncated-weights": (lambda d: os.truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size // 2),
                          r"model.safetensors' is truncated: tensor .* ends at byte"),
    "missing-tensor": (lambda d: _edit_weights(d, lambda s: s.pop(next(k for k in sorted(s) if k.endswith("q_proj.scales")))),
                       r"do not match the checkpoint's description \(missing model.layers.0.self_attn.q_proj.scales"),
}


def _edit_config(d: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    c = json.loads((d / "config.json").read_text())
    edit(c)
    (d / "config.json").write_text(json.dumps(c))


def _edit_weights(d: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    edit(state)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("damage,reader", [*((d, "eval") for d in sorted(CHECKPOINT_DAMAGE)),
                                           ("truncated-weights", "export"), ("truncated-weights", "from_pretrained"),
                                           ("missing-tensor", "from_pretrained")])
def test_a_damaged_checkpoint_is_named_by_every_reader(tmp_path: Path, ckpt: Path, damage: str, reader: str) -> None:
    d = tmp_path / "c"
    shutil.copytree(ckpt, d)
    edit, match = CHECKPOINT_DAMAGE[damage]
    edit(d)
    if reader == "from_pretrained":  # the library path: its exception is ours, with the same one-line message
        code = (f"import compress, transformers\ntry:\n    transformers.AutoModelForCausalLM.from_pretrained({str(d)!r})\n"
                "except compress.CompressError as e:\n    print('error:', e, file=__import__('sys').stderr); raise SystemExit(2)\n")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)
    elif reader == "eval":
        p = cli("eval", str(d), *EVAL, cwd=tmp_path)
    else:
        p = cli("export", str(d), "--format", "dense", "--out", "x", cwd=tmp_path)
        assert not (tmp_path / "x").exists()
    error_line(p, match)


# --- class 3: errors name the flags of the command that was run ------------------------------------------------

def _flags(command: str) -> set[str]:
    import typer

    from compress.cli.main import app

    group = typer.main.get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}


#: refusals of every command (in process; the message is checked against that command's parser)
REFUSALS: list[tuple[str, list[str], str]] = [
    ("run", ["--pass", "rtn:bits=4,group=0", "--ppl", "wikitext2", "--ppl-seqlen", "100000"], r"exceeds the model's max_position_embeddings"),
    ("run", ["--pass", "rtn:bits=4,group=0", "--ppl", "wikitext2", "--max-windows", "0"], r"max-windows"),
    ("run", ["--pass", "rtn:bits=4,group=0", "--tasks", "arc_easy", "--eval-batch-size", "0"], r"--eval-batch-size"),
    ("run", ["--pass", "gptq:bits=4,group=0", "--calib-samples", "100000"], r"fewer than samples x seqlen"),
    ("run", ["--pass", "rtn:bits=4,group=0", "--export", "foo"], r"unknown export format"),
    ("run", ["--pass", "rtn:bits=4,group=0", "--offload-dir", "/proc/nope"], r"offload"),
    ("run", ["--pass", "rtn:bits=4,group=0", "--device", "tpu"], r"unknown --device 'tpu'"),
    ("run", ["--pass", "rtn:bits=4,group=0", "--budget", "bits=3"], r"--budget"),
    ("run", ["--pass", "rtn:bits=4,group=0", "--search", "gptq"], r"--search"),
    ("run", ["--pass", "rtn:bits=4,group=0", "--export", "peft"], r"peft"),
    ("run", ["--pass", "gptq:bits=nan"], r"pass 'gptq' option 'bits': expected an integer, got 'nan'"),
    ("run", ["--pass", "svd-llm:ratio=inf"], r"expected a finite number"),
    ("run", ["--pass", "rtn:bits=4,group=0", "--seed", "99999999999999999999999"], r"--seed must be in"),
    ("run", ["--pass", "gptq:bits=4,group=0", "--calib-seqlen", "1024"], r"--calib-seqlen 1024 exceeds the model's max_position_embeddings 512"),
    ("run", ["--pass", "rtn:bits=4,group=0,bits=3"], r"'bits' is given twice"),
    ("run", ["--pass", "gptq:bits=4,group=0", "--calib", "mine.txt", "--calib-split", "validation"], r"--calib-split validation applies to the named"),
    ("run", ["--pass", "rtn:bits=4,group=0", "--frobnicate"], r"No such option: --frobnicate \(see 'compress run --help'\)"),
    ("run", ["--budget", "bits=0.5"], r"below the cheapest plan these candidates reach \(bits=2\.\d+"),
    ("sweep", ["--pass", "rtn:bits=4", "--grid", "group=0", "--eval", "ppl=wikitext2;ppl_seqlen=100000"], r"max_position_embeddings"),
    ("sweep", ["--pass", "rtn:bits=4", "--grid", "group=0", "--eval", "ppl=wikitext2;max_windows=0"], r"max_windows"),
    ("sweep", ["--pass", "rtn:bits=4", "--grid", "group=0", "--eval", "ppl=nope"], r"unknown perplexity dataset"),
    ("sweep", ["--pass", "gptq:bits=4", "--grid", "group=0", "--calib-samples", "100000", "--eval", "ppl=wikitext2;ppl_seqlen=128"],
     r"fewer than samples x seqlen"),
    ("sweep", ["--pass", "rtn:bits=4", "--eval", "ppl=wikitext2"], r"no values to sweep"),
    ("sweep", ["--pass", "rtn:bits=4", "--grid", "group=0", "--device", "gpu"], r"unknown --device"),
    ("eval", ["--ppl-seqlen", "100000"], r"max_position_embeddings"),
    ("eval", ["--speed", "--speed-prompt", "100000", "--max-windows", "1", "--ppl-seqlen", "128"], r"--speed-prompt 100000 \+ --speed-new 32 exceed"),
    ("eval", ["--json", "/proc/m.json"], r"--json '/proc/m.json' is not writable"),
    ("eval", ["--batch-size", "0", "--tasks", "arc_easy"], r"batch-size"),
    ("eval", ["--max-windows", "0"], r"max-windows"),
    ("eval", ["--ppl", "nope"], r"unknown perplexity dataset"),
    ("export", ["--format", "foo"], r"unknown export format 'foo'"),
    ("export", ["--format", "gptq"], r"not packable into 32-bit words.*do not pack at these bits: keep the compress checkpoint"),
    ("export", ["--format", "dense", "--overwrite", "SELF"], r"would replace the input"),
]


def _argv(command: str, extra: list[str], ckpt: Path, out: Path) -> list[str]:
    if command == "run":
        return ["run", str(STORIES), "--out", str(out / "o"), *SMALL, *extra]
    if command == "sweep":
        return ["sweep", str(STORIES), "--out", str(out / "s"), *SMALL, *extra]
    if command == "eval":
        return ["eval", str(ckpt), *extra]
    if "SELF" in extra:  # the checkpoint exported onto itself
        return ["export", str(ckpt), "--out", str(ckpt), *[x for x in extra if x != "SELF"]]
    return ["export", str(ckpt), "--out", str(out / "x"), *extra]


@pytest.mark.parametrize("command,extra,match", REFUSALS, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(REFUSALS)])
def test_every_refusal_names_flags_of_its_own_command(tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str], command: str, extra: list[str], match: str) -> None:
    from compress.cli.main import main

    for k in ("COMPRESS_DATA_DIR", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(k, ENV[k])
    monkeypatch.setattr(sys, "argv", ["compress", *_argv(command, extra, ckpt, tmp_path)])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    line = next((x for x in err.splitlines() if x.startswith("error:")), err)
    assert e.value.code != 0 and re.search(match, line), err[-2000:]
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line)) - set(extra) - {"--help"}  # the user's own flags quoted back
    assert named <= _flags(command), f"{command}: {sorted(named - _flags(command))} in {line!r}"


def test_the_library_names_only_flags_some_command_has() -> None:
    """Every flag a message of the library names is a flag of `compress run` (how the library spells
    options) or of the command that raises it; and each command's spelling of them is its own flag."""
    from compress.cli.flags import SPELLING
    from compress.cli.main import COMMANDS

    every = set().union(*(_flags(c) for c in COMMANDS if c != "lm-eval"))
    root = Path(__file__).resolve().parents[1]
    named: dict[str, str] = {}
    for p in [*root.joinpath("compress").rglob("*.py"), *root.joinpath("calib").rglob("*.py"), *root.joinpath("eval").rglob("*.py")]:
        if p.name == "lm_eval_cli.py":
            continue  # names lm-eval's own flags (--include_path, --model_args)
        for m in re.finditer(r"f?\"[^\"\n]*\"", p.read_text()):
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", m.group(0)):
                named.setdefault(flag, str(p.relative_to(root)))
    unknown = {f: where for f, where in named.items() if f not in every and f not in ("--nproc-per-node", "--help")}
    assert not unknown, unknown
    for command, table in SPELLING.items():
        for spelled in table.values():
            assert spelled.split()[0].rstrip("=") in _flags(command), (command, spelled)


# --- class 4: faults end in one line, and the state stays resumable --------------------------------------------

RUN = ["run", str(STORIES), "--pass", "gptq:bits=4,group=0", "--stream", *SMALL]


def _enospc_at(target: str, nth: int) -> str:
    """A prelude making the ``nth`` call of ``target`` (a writer) raise OSError(ENOSPC)."""
    mod, _, name = target.rpartition(".")
    return (
        f"import errno, {mod} as _m\n_orig = _m.{name}\n_n = [0]\n"
        f"def _full(*a, **k):\n    _n[0] += 1\n    if _n[0] == {nth}:\n        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        f"    return _orig(*a, **k)\n_m.{name} = _full\n"
    )


FULL_DISK = {
    # writing a finished layer's file (the second layer), the next layer's inputs, the final checkpoint
    "layer-progress": ("compress.stream.progress.save_file", 2, r"disk full while writing '.*o.partial/layer-00001.safetensors'.*finished layers \(1\) are kept"),
    "layer-inputs": ("torch.save", 2, r"disk full while writing '.*o.partial/inputs-00002.pt'.*rerun the same command to resume"),
    "final-checkpoint": ("compress.checkpoint.save_file", 1, r"disk full while writing '.*o'.*every layer is kept in .*o.partial"),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("ref")
    p = cli(*RUN, "--out", "o", cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    return _files(root / "o")


@pytest.mark.parametrize("case", sorted(FULL_DISK))
def test_a_full_disk_is_one_line_and_the_rerun_is_identical(tmp_path: Path, uninterrupted: dict[str, bytes], case: str) -> None:
    target, nth, match = FULL_DISK[case]
    p = cli(*RUN, "--out", "o", cwd=tmp_path, prelude=_enospc_at(target, nth))
    error_line(p, match, only=False)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))
    again = cli(*RUN, "--out", "o", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _files(tmp_path / "o") == uninterrupted


def test_a_full_offload_dir_is_one_line(tmp_path: Path) -> None:
    p = cli(*RUN, "--out", "o", "--offload-dir", "off", cwd=tmp_path, prelude=_enospc_at("torch.save", 1))
    error_line(p, r"disk full while writing '.*off/activations-.*free space or choose another --offload-dir", only=False)


def test_a_real_full_disk(tmp_path: Path, uninterrupted: dict[str, bytes]) -> None:
    """On a small tmpfs (where the test may mount one): torch's and safetensors' own short-write errors."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (the injected ENOSPC cases cover the writers)")
    try:
        p = cli(*RUN, "--out", str(mnt / "o"), cwd=tmp_path)
        error_line(p, r"disk full while writing .*rerun the same command", only=False)
        shutil.copytree(mnt / "o.partial", tmp_path / "o.partial")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    again = cli(*RUN, "--out", "o", cwd=tmp_path)
    assert again.returncode == 0 and "resuming at layer" in again.stderr, again.stderr[-3000:]
    assert _files(tmp_path / "o") == uninterrupted


def test_a_progress_directory_missing_a_finished_layer_is_named(tmp_path: Path) -> None:
    p = cli(*RUN, "--out", "o", cwd=tmp_path, prelude=_enospc_at("torch.save", 3))
    assert p.returncode != 0 and (tmp_path / "o.partial" / "layer-00001.safetensors").is_file()
    (tmp_path / "o.partial" / "layer-00001.safetensors").unlink()
    error_line(cli(*RUN, "--out", "o", cwd=tmp_path), r"lacks 'layer-00001.safetensors', the file of finished layer 2; rerun with --restart", only=False)


def test_a_resume_after_the_last_layer_writes_the_checkpoint(tmp_path: Path, uninterrupted: dict[str, bytes]) -> None:
    p = cli(*RUN, "--out", "o", cwd=tmp_path, prelude=_enospc_at("compress.checkpoint.save_file", 1))
    assert p.returncode != 0
    again = cli(*RUN, "--out", "o", cwd=tmp_path)
    assert again.returncode == 0 and "writing the checkpoint" in again.stderr and "resuming at layer" not in again.stderr, again.stderr[-3000:]
    assert _files(tmp_path / "o") == uninterrupted


def test_a_killed_final_write_leaves_nothing_after_the_rerun(tmp_path: Path) -> None:
    """What kill -9 during the final write leaves (the temporary and its lock file, no process holding
    it; or a temporary from before the lock files) is removed by the next writer of the directory."""
    for stale in (".o.tmp-0123456789ab", ".o.tmp-abcdef"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".o.tmp-0123456789ab.lock").touch()
    p = cli(*RUN, "--out", "o", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["o"]


def test_a_live_writers_temporary_is_kept(tmp_path: Path) -> None:
    from compress.fsutil import remove_stale, try_lock

    (tmp_path / ".o.tmp-0123456789ab").mkdir()
    held = try_lock(tmp_path / ".o.tmp-0123456789ab.lock")
    remove_stale(tmp_path / "o")
    assert (tmp_path / ".o.tmp-0123456789ab").is_dir()
    assert held is not None
    held.close()


# --- class 5: distributed runs ----------------------------------------------------------------------------------

def _torchrun(cwd: Path, nproc: int, *args: str) -> subprocess.CompletedProcess[str]:
    port = str(29500 + (os.getpid() * 7 + nproc) % 1000)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", port, "-m", "compress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=ENV)


@pytest.mark.slow
def test_a_refusal_under_torchrun_is_one_line_from_rank_0(tmp_path: Path) -> None:
    p = _torchrun(tmp_path, 2, "run", str(STORIES), "--pass", "modegpt:ratio=0.2", "--out", "o", *SMALL)
    p.stderr = "\n".join(x for x in p.stderr.splitlines() if not re.match(r"^[WI]\d{4} ", x))  # torchrun's own banner
    error_line(p, r"modegpt reads the layer's calibration inputs .* run it in one process")
    assert "ChildFailedError" not in p.stderr and not (tmp_path / "o").exists()


def test_a_progress_directory_of_another_process_count_is_named(tmp_path: Path) -> None:
    from compress.errors import CompressError
    from compress.stream import Progress

    Progress(tmp_path / "a", {"recipe": 1, "processes": 2}).release()
    with pytest.raises(CompressError, match=r"run of 2 process\(es\) and this run has 1: resume it with torchrun --nproc-per-node 2"):
        Progress(tmp_path / "a", {"recipe": 1})
    Progress(tmp_path / "b", {"recipe": 1}).release()
    with pytest.raises(CompressError, match=r"run of 1 process\(es\) and this run has 2: resume it in one process"):
        Progress(tmp_path / "b", {"recipe": 1, "processes": 2})


# --- classes 6-9: lm-eval, devices, sweeps, messages that pointed the wrong way ----------------------------------

def test_the_lm_eval_pass_through_refuses_in_one_line(tmp_path: Path, ckpt: Path) -> None:
    pytest.importorskip("lm_eval")
    error_line(cli("lm-eval", "--model", "hf", "--model_args", f"pretrained={ckpt}", "--tasks", "nosuchtask", cwd=tmp_path),
               r"unknown task\(s\) nosuchtask")
    error_line(cli("lm-eval", "--model", "hf", "--model_args", "pretrained=/no/such/dir", "--tasks", "arc_easy", cwd=tmp_path),
               r"pretrained=/no/such/dir: '/no/such/dir' does not exist")


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x"])
def test_unknown_devices_list_the_accepted_values(tmp_path: Path, device: str) -> None:
    p = cli("run", str(STORIES), "--pass", "rtn:bits=4,group=0", "--device", device, "--out", "o", cwd=tmp_path)
    error_line(p, r"--device '.*'.*accepted values: cpu, cuda, cuda:N or auto")


def test_a_sweep_in_which_every_point_fails_exits_non_zero(tmp_path: Path) -> None:
    p = cli("sweep", str(STORIES), "--pass", "rtn:bits=4", "--grid", "group=32,64", "--out", "s", "--eval", "ppl=wikitext2;max_windows=1;ppl_seqlen=128", cwd=tmp_path)
    error_line(p, r"every grid point failed \(2 of 2\); the first, rtn:bits=4,group=32: .*group size 32", only=False)


@pytest.mark.parametrize("eval_text", ["ppl=wikitext2;ppl_seqlen=100000", "ppl=wikitext2;max_windows=0", "tasks=nosuchtask"])
def test_sweep_refusals_come_before_loading_and_leave_no_directory(tmp_path: Path, eval_text: str) -> None:
    p = cli("sweep", str(STORIES), "--pass", "rtn:bits=4", "--grid", "group=0", "--out", "s", "--eval", eval_text, cwd=tmp_path)
    error_line(p, r"--eval|task")
    assert not (tmp_path / "s").exists()


def test_recipe_paths_that_are_not_files(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "q.yaml").write_text("passes:\n  - {pass: rtn, bits: 4, group: 0}\n")
    error_line(cli("run", str(STORIES), "--recipe", "myrecipe", "--out", "o", cwd=tmp_path), r"recipe file 'myrecipe' does not exist")
    error_line(cli("run", str(STORIES), "--recipe", "recipes", "--out", "o", cwd=tmp_path),
               r"recipe 'recipes' is a directory, not a file; give the file, e.g. --recipe recipes/q.yaml")
    (tmp_path / "nosrc.yaml").write_text("passes:\n  - {pass: gptq, bits: 4, group: 0}\ncalibration: {source: nosuch.txt}\n")
    error_line(cli("validate", "nosrc.yaml", cwd=tmp_path), r"unknown data source 'nosuch.txt'")  # what a run would refuse
    (tmp_path / "c4.yaml").write_text("passes:\n  - {pass: gptq, bits: 4, group: 0}\ncalibration: {source: c4}\n")
    error_line(cli("validate", "c4.yaml", "--data-dir", "nodata", cwd=tmp_path), r"data directory 'nodata' does not exist")
    ok = cli("validate", "c4.yaml", "--data-dir", str(DATA_DIR), cwd=tmp_path)
    assert ok.returncode == 0 and "recipe is valid" in ok.stdout, ok.stderr[-2000:]
    (tmp_path / "bad.yaml").write_text("passes:\n  - {pass: rtn, bits: 4, group: 0}\ncalibration: {samples: many}\n")
    error_line(cli("run", str(STORIES), "--recipe", "bad.yaml", "--out", "o", cwd=tmp_path), r"the recipe's 'calibration: samples'.*'many'")


def test_outputs_that_are_files_unwritable_or_the_input(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    shutil.copytree(STORIES, tmp_path / "m")
    rtn = ["--pass", "rtn:bits=4,group=0"]
    error_line(cli("run", "m", *rtn, "--out", "m", "--overwrite", cwd=tmp_path), r"--out 'm' would replace the input 'm'")
    error_line(cli("run", "m", *rtn, "--out", "afile", cwd=tmp_path), r"output path 'afile' is a file; choose another --out")
    error_line(cli("sweep", "m", "--pass", "rtn:bits=4", "--grid", "group=0", "--out", "afile", cwd=tmp_path), r"'afile' is a file")
    if os.geteuid() == 0:  # root may write anywhere os.access is asked about; /proc still refuses new files
        error_line(cli("run", "m", *rtn, "--out", "/proc/x", cwd=tmp_path), r"--out '/proc/x' is not writable: no file can be made in '/proc'")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["afile", "m"]


def test_a_sweep_resumed_with_other_settings_is_refused(tmp_path: Path) -> None:
    args = ["sweep", str(STORIES), "--pass", "rtn:bits=4", "--grid", "group=0", "--out", "s", "--eval", "ppl=wikitext2;max_windows=1;ppl_seqlen=128"]
    assert cli(*args, "-q", cwd=tmp_path).returncode == 0
    error_line(cli(*args, "--calib-samples", "4", cwd=tmp_path), r"was run with other settings \(calibration.samples 32 then, 4 now\)")


def test_a_damaged_index_is_named(tmp_path: Path) -> None:
    shutil.copytree(STORIES, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text('{"weight_map": [1, 2]}')
    error_line(cli("run", "m", "--pass", "rtn:bits=4,group=0", "--out", "o", cwd=tmp_path), r"is not a valid index \(no weight_map")
    (tmp_path / "m" / "model.safetensors.index.json").write_text('{"weight_map": ')
    error_line(cli("run", "m", "--pass", "rtn:bits=4,group=0", "--out", "o", cwd=tmp_path), r"index.json' is not valid JSON \(line 1")


def test_run_help_lists_every_export_format() -> None:
    from typer.testing import CliRunner

    from compress.cli.main import app
    from compress.exports import EXPORTS

    text = " ".join(CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "2000"}).output.split())
    assert all(f"{name} (" in text for name in EXPORTS), text


def test_the_source_is_recorded_as_an_absolute_path(tmp_path: Path) -> None:
    shutil.copytree(STORIES, tmp_path / "m")
    p = cli("run", "m", "--pass", "rtn:bits=4,group=0", "--out", "o", "-q", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    source = json.loads((tmp_path / "o" / "manifest.json").read_text())["source"]
    assert source["source"] == str((tmp_path / "m").resolve()) and source["source_as_given"] == "m"


def test_disk_full_classification() -> None:
    """Writers report a full disk in their own ways; each is recognised (a short write only when the
    file system is nearly full)."""
    from compress.fsutil import disk_full

    assert disk_full(OSError(errno.ENOSPC, "x"), Path("/")) is not None
    assert disk_full(RuntimeError("No space left on device (os error 28)"), Path("/")) is not None
    assert disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 918"), Path("/proc")) is not None
    assert disk_full(ValueError("bad value"), Path("/")) is None
    assert disk_full(OSError(errno.EACCES, "denied"), Path("/tmp")) is None
