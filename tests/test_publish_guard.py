"""The publish guard judges bytes, not names: real tensor/model files (torch, safetensors, numpy,
ONNX from torch's own exporter, GGUF, HDF5, pickles) under innocent names, credentials anywhere in a
file and in UTF-16/32, are refused with their reason, nothing staged; ordinary artifacts (JSON,
curves, manifests with sha256 digests, real matplotlib figures, CSVs, a realistic log) pass."""
import collections
import gzip
import io
import json
import pickle
import random
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from opskit.results.content_guard import CHUNK, credential_findings, credential_warnings, scan_file
from opskit.results.publish import PublishRefused, publish
from test_results_publish import git, repo, snapshot, tree  # noqa: F401  (fixture re-export)

RUN = "results/raw/p0/geo_500k"
rng = random.Random(20)


def rand(n: int, alphabet: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789") -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def hexkey(n: int = 40) -> str:
    return rand(n, "0123456789abcdef")


# ---------------------------------------------------------------- real files of each format


def torch_bytes(obj, **kw) -> bytes:
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def torchscript_bytes() -> bytes:
    import torch
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), buf)
    return buf.getvalue()


def onnx_bytes(tmp: Path) -> bytes:
    """A real ONNX file from torch's TorchScript exporter. Its last step only adds onnxscript functions
    (none here) and needs the onnx package, which is not installed: the serialized model is kept as is."""
    import torch
    from torch.onnx._internal.torchscript_exporter import onnx_proto_utils
    orig = onnx_proto_utils._add_onnxscript_fn
    onnx_proto_utils._add_onnxscript_fn = lambda model_bytes, custom_opsets: model_bytes
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        torch.onnx.export(model, (torch.randn(1, 4),), str(tmp / "m.onnx"), dynamo=False)
    finally:
        onnx_proto_utils._add_onnxscript_fn = orig
    return (tmp / "m.onnx").read_bytes()


def safetensors_bytes() -> bytes:
    import torch
    from safetensors.torch import save
    return save({"embed.weight": torch.randn(64, 16), "head.bias": torch.zeros(16)}, metadata={"format": "pt"})


def npy_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def npz_bytes(compressed: bool) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, w=np.ones((8, 8), np.float32), b=np.zeros(8))
    return buf.getvalue()


def gguf_bytes() -> bytes:
    """GGUF v3 as llama.cpp writes it: header, one string KV, one F32 tensor info, aligned data."""
    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()
    out = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)
    out += string("general.architecture") + struct.pack("<I", 8) + string("llama")
    out += string("blk.0.attn_q.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 4) + struct.pack("<IQ", 0, 0)
    out += b"\0" * (-len(out) % 32)
    return out + np.arange(16, dtype=np.float32).tobytes()


def hdf5_bytes(user_block: int = 0) -> bytes:
    """An HDF5 version-0 superblock (h5py is not installed): signature, versions, sizes of offsets and
    lengths, B-tree K values, addresses, the root group's symbol table entry."""
    undefined = 0xFFFFFFFFFFFFFFFF
    eof = user_block + 96 + 2048
    sb = b"\x89HDF\r\n\x1a\n" + bytes([0, 0, 0, 0, 0, 8, 8, 0]) + struct.pack("<HHI", 4, 16, 0)
    sb += struct.pack("<QQQQ", 0, undefined, eof, undefined)
    sb += struct.pack("<QQII", 0, 96, 1, 0) + struct.pack("<QQ", 136, 680)  # root symbol table entry
    return b"U" * user_block + sb + b"\0" * (eof - user_block - len(sb))


def crc32c(data: bytes) -> int:  # bitwise, independent of the guard's table
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def tfrecord(records: list[bytes]) -> bytes:
    def masked(data: bytes) -> int:
        c = crc32c(data)
        return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
    out = b""
    for r in records:
        length = struct.pack("<Q", len(r))
        out += length + struct.pack("<I", masked(length)) + r + struct.pack("<I", masked(r))
    return out


def figure(fmt: str) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2, 3], [10.8, 5.0, 3.2, 2.3], label="loss")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    plt.close(fig)
    return buf.getvalue()


def log_lines(n: int, start: int = 0) -> list[str]:
    """What train/run.py and its libraries print over a run."""
    out = []
    for i in range(start, start + n):
        out.append(f"[12:{i // 60 % 60:02d}:{i % 60:02d}] step {i}/240000 loss {2 + rng.random():.4f} lr 3.00e-04 "
                   f"tok/s {rng.randint(9000, 12000)} grad_norm {rng.random():.3f} tokens_per_s={rng.random() * 1e5:.12f}")
    return out


REALISTIC_LOG = "\n".join([
    "=== attempt 1 ===",
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin", "PWD=/scratch/opskit/runs/p0/geo_500k/s1",
    "TOKENIZERS_PARALLELISM=false", "HF_HUB_OFFLINE=1", "GPG_KEY=7169605F62C751356D054A26A821E680E5FA6305",
    "HF_TOKEN_PATH=/root/.cache/huggingface/token", "AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY",
    "WANDB_API_KEY=<your key here>", "password: ********", "api_key=<redacted>",
    "wandb: Currently logged in as: alice. Use `wandb login --relogin` to force relogin",
    "wandb: Appending key for api.wandb.ai to your netrc file: /root/.netrc",
    f"code at commit {hexkey(40)} (clean); cache key tok/{hexkey(32)}",
    f"tokenizer: opskit-demo-bpe-tokenizer-v2 max_tokens: 200000 sha256: {hexkey(64)}",
    "Downloading https://files.pythonhosted.org/packages/9a/torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl",
    "Token is valid (permission: read). Your token has been saved to /root/.cache/huggingface/token",
    '{"step": 10, "tokens": 40960, "loss": 5.012345678901234, "lr": 0.0003, "tokens_per_s": 11234.567890123456}',
    "[12:00:01] model tiny: 1,234,567 parameters, fp32 compute, world size 2",
    *log_lines(200),
    "Traceback (most recent call last):",
    '  File "/venv/lib/python3.11/site-packages/torch/_utils.py", line 200, in _rebuild_tensor_v2',
    "    storage = torch.UntypedStorage._new_shared_filename_cpu(manager, handle, size)",
    "RuntimeError: unable to mmap 1048576 bytes from file </torch_1234_5678_0>: Cannot allocate memory (12)",
    "[12:10:00] checkpoint step 200 saved in 0.4s", "[12:10:05] phase done", ""])


def ordinary(tmp: Path) -> dict[str, bytes]:
    """Artifacts publish must let through."""
    manifest = {"run": "p0/geo_500k/s1", "target": "local", "attempt": 1, "state": "done", "pulled_at": 1763900000.0,
                "files": [{"path": f, "size": 1234, "sha256": hexkey(64)} for f in ("run.log", "results.json", "spec.json")]}
    curve = "".join(json.dumps({"step": i, "tokens": 4096 * i, "loss": 10 / (i + 1), "lr": 3e-4, "grad_norm": 1.0,
                                "tokens_per_s": 1000.0 + i, "time": 1763900000.0 + i}) + "\n" for i in range(500))
    event = struct.pack("<Bd", 0x09, 1763900000.0) + b"\x1a\x0dbrain.Event:2"
    return {
        f"{RUN}/seed42/results.json": json.dumps({"final_train_loss": 2.3, "ppl": {"2048": 10.1}, "params": 1.5e9}).encode(),
        f"{RUN}/seed42/loss_curve.jsonl": curve.encode(),
        f"{RUN}/seed42/manifest.json": json.dumps(manifest, indent=1).encode(),
        f"{RUN}/seed42/run.log": REALISTIC_LOG.encode(),
        f"{RUN}/seed42/status.json": json.dumps({"state": "done", "step": 240, "message": "done"}).encode(),
        "results/processed/figures/fig1_train_loss.png": figure("png"),
        "results/processed/figures/fig1_train_loss.svg": figure("svg"),
        "results/processed/figures/fig1_train_loss.pdf": figure("pdf"),
        "results/processed/figures/fig1_train_loss.jpg": figure("jpg"),
        "results/processed/runs.csv": b"phase,config,seed,ppl@2048\np0,geo_500k,1,10.1\n" * 50,
        "results/processed/summary.md": "# Résumé — p0\n\n| config | ppl |\n|---|---|\n| geo_500k | 10.1 ± 0.2 |\n".encode(),
        "results/processed/notes_utf16.txt": "notes: loss 2.3 at step 240\n".encode("utf-16"),
        f"{RUN}/seed42/events.out.tfevents.1763900000.box": tfrecord([event]),
    }


def planted(tmp: Path) -> list[tuple[str, str, bytes, str]]:
    """(path, kind, bytes, reason the guard must give)."""
    import torch
    state = {"w": torch.randn(8, 8), "step": 4}
    s = f"{RUN}/seed"
    payload_png = figure("png") + safetensors_bytes()
    big = "\n".join(log_lines(26000)) + "\n"  # > 2 MiB of log before the token
    head = "x" * (CHUNK - 21) + " "  # the key starts 20 bytes before the 1 MiB chunk boundary
    sk = rand(48, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
    return [
        (f"{s}1/weights.dat", "safetensors", safetensors_bytes(), "safetensors tensor file"),
        (f"{s}1/loss.png", "safetensors", safetensors_bytes(), "safetensors tensor file"),
        (f"{s}2/eval.json", "safetensors", safetensors_bytes(), "safetensors tensor file"),
        (f"{s}1/state.txt", "torch zip (torch.save)", torch_bytes(state), "torch checkpoint (torch.save zip)"),
        (f"{s}2/model.log", "torch zip (torch.save)", torchscript_bytes(), "torch checkpoint (torch.save zip)"),
        (f"{s}2/old.dat", "torch legacy pickle", torch_bytes(state, _use_new_zipfile_serialization=False),
         "torch pickle (torch.save legacy format)"),
        (f"{s}2/cache.dat", "Python pickle", pickle.dumps({"a": np.ones(3)}, protocol=5), "Python pickle holding numpy arrays"),
        (f"{s}3/p0.txt", "Python pickle", pickle.dumps({"a": 1, "b": [1, 2]}, protocol=0), "Python pickle"),
        (f"{s}1/arr.npy", "numpy .npy", npy_bytes(np.ones((4, 4), np.float32)), "numpy .npy array"),
        (f"{s}2/arr.csv", "numpy .npy", npy_bytes(np.arange(10)), "numpy .npy array"),
        (f"{s}1/arrays.npz", "numpy .npz", npz_bytes(False), "numpy .npz array archive"),
        (f"{s}3/bundle.dat", "numpy .npz", npz_bytes(True), "numpy .npz array archive"),
        (f"{s}1/model.onnx", "ONNX", onnx_bytes(tmp), "ONNX model"),
        (f"{s}2/graph.json", "ONNX", onnx_bytes(tmp), "ONNX model"),
        (f"{s}1/tiny.gguf", "GGUF", gguf_bytes(), "GGUF model file"),
        (f"{s}2/blob.dat", "GGUF", gguf_bytes(), "GGUF model file"),
        (f"{s}1/weights.h5", "HDF5", hdf5_bytes(), "HDF5 file"),
        (f"{s}3/userblock.dat", "HDF5", hdf5_bytes(512), "HDF5 file"),
        (f"{s}3/raw.dat", "raw tensor bytes", np.random.default_rng(0).standard_normal(4096).astype(np.float32).tobytes(),
         "binary data of no known results format"),
        (f"{s}3/examples.tfrecord", "TFRecord", tfrecord([b"\x0a\x10" + bytes(range(16))] * 3), "TFRecord file"),
        (f"{s}3/bundle.zip", "archive", _zip({"a.csv": b"x\n1\n"}), "a zip archive: publish its files unpacked"),
        (f"{s}3/logs.gz", "archive", gzip.compress(b"log\n" * 100), "a gzip file: publish its files unpacked"),
        (f"{s}1/fig_payload.png", "PNG with a payload", payload_png, "a PNG with"),
        (f"{s}1/run.log", "W&B key", (REALISTIC_LOG + f"export WANDB_API_KEY={hexkey()}\n").encode(),
         f"what looks like a WANDB_API_KEY (line {REALISTIC_LOG.count(chr(10)) + 1})"),
        (f"{s}2/run.log", "W&B key", f"[12:00:00] start\nwandb login --relogin {hexkey()}\n".encode(), "a W&B API key (line 2)"),
        (f"{s}2/aws.ini", "AWS key", f"[default]\naws_access_key_id = AKIA{rand(16, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567')}\n"
                                     f"aws_secret_access_key = {rand(40)}\n".encode(), "AWS"),
        (f"{s}3/env_dump.log", "AWS key", f"AWS_SECRET_ACCESS_KEY={rand(40)}\n".encode(), "an AWS_SECRET_ACCESS_KEY (line 1)"),
        (f"{s}3/big.log", "token after 2 MiB", (big + f"HF_TOKEN=hf_{rand(34)}\n").encode(),
         f"what looks like a HF_TOKEN (line {big.count(chr(10)) + 1})"),
        (f"{s}3/boundary.log", "token across a chunk boundary", (head + f"WANDB_API_KEY={hexkey()}\n").encode(),
         "what looks like a WANDB_API_KEY (line 1)"),
        (f"{s}1/run_utf16.log", "UTF-16/32 text", (REALISTIC_LOG + f"WANDB_API_KEY={hexkey()}\n").encode("utf-16"),
         "a WANDB_API_KEY"),
        (f"{s}2/notes.txt", "UTF-16/32 text", f"see below\nHF_TOKEN=hf_{rand(34)}\n".encode("utf-16-be"), "a HF_TOKEN (line 2)"),
        (f"{s}3/u32.txt", "UTF-16/32 text", f"token ghp_{rand(36)}\n".encode("utf-32-le"), "a GitHub token (line 1)"),
        (f"{s}1/prod.env", ".env file", b"DEBUG=1\n", "looks like a secret (file name)"),
        (f"{s}2/.env", ".env file", b"LOG_LEVEL=info\n", "looks like a secret (file name)"),
        (f"{s}1/key.txt", "private key", b"-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\n",
         "a private key (line 1)"),
        (f"{s}1/gh.log", "GitHub token", f"cloning with ghp_{rand(36)}\n".encode(), "a GitHub token"),
        (f"{s}2/pat.txt", "GitHub token", f"github_pat_{rand(22)}_{rand(59)}\n".encode(), "a GitHub token"),
        (f"{s}1/slack.log", "Slack token", f"bot xoxb-{rand(12, '0123456789')}-{rand(13, '0123456789')}-{rand(24)}\n".encode(),
         "a Slack token"),
        (f"{s}2/hook.txt", "Slack token", f"posted to https://hooks.slack.com/services/T{rand(8)}/B{rand(8)}/{rand(24)}\n".encode(),
         "a Slack webhook URL"),
        (f"{s}1/openai.log", "OpenAI/Anthropic key", f"client key sk-proj-{sk}\n".encode(), "an OpenAI-style API key"),
        (f"{s}2/claude.log", "OpenAI/Anthropic key", f"using sk-ant-api03-{rand(93)}AA\n".encode(), "an Anthropic API key"),
        (f"{s}3/hub.log", "Hugging Face token", f"login with hf_{rand(34)} done\n".encode(), "a Hugging Face token"),
    ]


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def write(work: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data)


def test_planted_files_are_refused_by_content_and_ordinary_ones_pass(repo, tmp_path):
    work, remote = repo
    plants = planted(tmp_path)
    assert all(len(data) < 5 * 2**20 for _, _, data, _ in plants)  # none is refused for its size alone
    write(work, ordinary(tmp_path))
    write(work, {rel: data for rel, _, data, _ in plants})
    (work / f"{RUN}/seed3/link.json").symlink_to(work / "README.md")
    before = snapshot(work)
    with pytest.raises(PublishRefused) as err:
        publish(work / "results")
    refused = err.value.refused
    lines = str(err.value).splitlines()
    assert lines[0] == f"refusing to publish {len(plants) + 1} files (nothing was committed or staged):"
    for rel, _, _, reason in plants:
        assert rel in refused, f"{rel} was not refused"
        assert f"  {rel}: " in str(err.value) and reason in "; ".join(refused[rel]), (rel, refused[rel])
    assert refused[f"{RUN}/seed3/link.json"] == ["a symlink"]
    assert set(refused) == {rel for rel, *_ in plants} | {f"{RUN}/seed3/link.json"}  # no ordinary file among them
    assert snapshot(work) == before and git(work, "diff", "--cached", "--name-only") == ""
    assert tree(remote, "main") == {"README.md", ".gitignore"}

    kinds = collections.Counter(kind for _, kind, _, _ in plants)
    print(f"\nplanted and refused: {len(plants)} files of {len(kinds)} kinds (+1 symlink)")
    for kind, n in kinds.items():
        print(f"  {n}  {kind}")

    for rel, *_ in plants:  # without them, the ordinary artifacts publish
        (work / rel).unlink()
    (work / f"{RUN}/seed3/link.json").unlink()
    result = publish(work / "results")
    assert set(ordinary(tmp_path)) <= set(result.files) and result.pushed_to == "origin/main"
    assert set(ordinary(tmp_path)) <= tree(remote, "main")


def test_credentials_are_found_with_their_line_anywhere_in_a_file(tmp_path):
    lines = log_lines(30000)  # ~3.7 MiB, several chunks
    key = hexkey()
    lines[5] += f" WANDB_API_KEY={key}"
    lines[-2] += f" aws_secret_access_key={rand(40)}"
    p = tmp_path / "run.log"
    p.write_text("\n".join(lines) + "\n")
    assert p.stat().st_size > 3 * CHUNK
    found = credential_findings(p)
    assert [(f.line, f.what) for f in found] == [(6, "what looks like a WANDB_API_KEY"),
                                                 (29999, "what looks like an AWS_SECRET_ACCESS_KEY")]
    assert str(found[0]) == "what looks like a WANDB_API_KEY (line 6)"
    # a key split over the chunk boundary at every offset around it, in UTF-8 and UTF-16 without a BOM
    for cut in (1, 13, 14, 30, 53):
        for encoding, width in (("utf-8", 1), ("utf-16-le", 2)):
            text = "a" * (CHUNK // width - cut) + f"\nWANDB_API_KEY={key}\n"
            p.write_bytes(text.encode(encoding))
            assert [str(f) for f in credential_findings(p)] == ["what looks like a WANDB_API_KEY (line 2)"], (cut, encoding)
    p.write_text("\n".join(lines[10:100]) + "\n")
    assert credential_findings(p) == []


def test_pull_warnings_name_the_file_and_line(tmp_path):
    write(tmp_path, {"run.log": f"start\nexport WANDB_API_KEY={hexkey()}\nHF_TOKEN=hf_{rand(34)}\n".encode(),
                     "results.json": b'{"final_train_loss": 2.3}', "loss.png": figure("png")})
    assert credential_warnings(tmp_path, ["run.log", "results.json", "loss.png", "gone.txt"]) == [
        "run.log contains what looks like a WANDB_API_KEY (line 2), a HF_TOKEN (line 3)"]


def test_the_project_s_own_fixtures_and_docs_hold_no_false_alarm():
    root = Path(__file__).parent.parent
    files = [p for d in ("tests/fixtures", "docs", "configs") for p in (root / d).rglob("*") if p.is_file()]
    assert len(files) > 20
    assert {str(p.relative_to(root)): found for p in files if (found := scan_file(p))} == {}


def test_a_credential_is_found_wherever_the_scan_seams_fall():
    """scan_pieces searches up to OVERLAP characters short of what it holds: put that seam at every
    position of a line with a long variable name, a key and a token."""
    from opskit.results.credentials import OVERLAP, scan_pieces
    line = f"export HUGGING_FACE_HUB_TOKEN=hf_{rand(34)} && wandb login {hexkey()}\n"
    text = "x y\n" * 2000 + line + "z w\n" * 2000  # the first piece must run OVERLAP past each seam
    at = text.index(line)
    for seam in range(at - 2, at + len(line) + 2):
        cut = seam + OVERLAP
        assert scan_pieces([text[:cut], text[cut:]]) == [(2001, "a HUGGING_FACE_HUB_TOKEN")], seam
