"""Write a checkpoint's int8 / int4 form once, so that later loads read packed weights (`dschat quantize`).

The source streams tensor by tensor (FP8 blocks dequantised first) and the output is written in shards of
at most `shard_bytes`, so host memory holds one output shard, never the model. The directory gets the
source's config.json with a `quantization_config` saying how it is quantized (quant_method "dschat"), a
safetensors index, and every other file of the source (tokenizer, generation config, chat template). It is
built in a temporary directory beside the target and renamed into place: a failure leaves nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import tempfile
from fnmatch import fnmatch
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..kernels.fp8_matmul import dequantize_fp8

from .config import ModelConfig
from .config_check import check_config
from .errors import ModelError
from .checkpoint import Checkpoint
from .hub import resolve
from .loader import Progress
from .memory import peak_host_bytes
from .quant import QuantSpec, is_quantized, quantize, spec
from . import files

SHARD_BYTES = 2 * 2**30
# The source's files that still hold for the quantized weights (not its checksums, say).
CARRIED = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "*.jinja", "*.py", "LICENSE*",
           "README*")


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, quant: str,
                        progress: Progress | None = None, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write `src` (a directory or hub id) quantized to `out`, which must not exist. Returns figures:
    tensors, bytes_in, bytes_out, peak_host_bytes."""
    s = spec(quant)
    if s is None:
        raise ValueError("no quantization asked for (use int8 or int4)")
    out = Path(out)
    check_output(out)
    root = resolve(src)
    cfg = ModelConfig.from_file(root / "config.json")
    if cfg.weight_quant is not None:
        raise ModelError(f"{root}: already quantized (quant_method dschat); quantize the original checkpoint")
    ckpt = Checkpoint(root)
    try:
        check_config(cfg, ckpt.shapes, str(root))  # a config that disagrees with its tensors: said now
    finally:
        ckpt.close()
    remove_stale(out)
    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as e:
        raise ModelError(f"{out}: cannot write here ({e.strerror})") from None
    held = _hold(tmp)  # while held, no other quantize takes it for a stale one
    try:
        figures = _write(root, tmp, cfg, s, progress or (lambda done, total: None), shard_bytes)
        os.rename(tmp, out)
    except (OSError, SafetensorError) as e:  # disk full, a file-size limit: the output named, not the temporary
        shutil.rmtree(tmp, ignore_errors=True)
        why = getattr(e, "strerror", None) or str(e).rpartition("I/O error: ")[2] or type(e).__name__
        raise ModelError(f"{out}: cannot write ({why}); nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(held)
    return figures


TMP_EXTRA = len(".") + len(".XXXXXXXX") + len(".tmp")  # what mkdtemp adds to the output's name


def check_output(out: Path):
    """The output directory is checked before any work, and named in what is wrong with it: it must not exist
    (a dangling symlink neither), its parent must be a writable directory, and its name short enough for the
    temporary directory beside it (.NAME.XXXXXXXX.tmp)."""
    if out.exists() or out.is_symlink():
        raise ModelError(f"{out}: already exists{' (a symlink)' if out.is_symlink() else ''}; name a new directory")
    if not out.parent.is_dir():
        raise ModelError(f"{out.parent}: no such directory")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ModelError(f"{out}: cannot write in {out.parent} (permission denied)")
    try:
        name_max = os.pathconf(out.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(out.name)) + TMP_EXTRA > name_max:
        raise ModelError(f"{out}: the name is too long (at most {name_max - TMP_EXTRA} bytes here: dschat "
                         f"writes it first as .NAME.XXXXXXXX.tmp beside it)")


def _hold(tmp: Path) -> int:
    fd = os.open(tmp, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def remove_stale(out: Path):
    """Remove the temporary directories of earlier runs for `out` that died without cleaning up (SIGKILL):
    .NAME.XXXXXXXX.tmp beside it that no running quantize holds."""
    for d in out.parent.glob(f".{glob_escape(out.name)}.*.tmp"):
        if d.is_symlink() or not d.is_dir() or len(d.name) != len(out.name) + TMP_EXTRA:
            continue
        try:
            fd = _hold(d)
        except OSError:
            continue  # another quantize is writing it
        try:
            shutil.rmtree(d, ignore_errors=True)
        finally:
            os.close(fd)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _write(root: Path, out: Path, cfg: ModelConfig, s: QuantSpec, progress: Progress, shard_bytes: int) -> dict:
    ckpt = Checkpoint(root)
    block = tuple(cfg.fp8_block_size or (128, 128))
    total, done, written, count = ckpt.total_bytes(), 0, 0, 0
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    try:
        for path, names in ckpt.by_file().items():
            for name in names:
                if name.endswith("_scale_inv"):
                    continue
                t = ckpt.get(name)
                done += t.numel() * t.element_size()
                if t.dtype == torch.float8_e4m3fn:
                    t = dequantize_fp8(t, ckpt.get(name + "_scale_inv"), block).to(torch.bfloat16)
                for n, v in _converted(name, t, s).items():
                    if size + v.numel() * v.element_size() > shard_bytes and shards[-1]:
                        written += _flush(out, shards, len(shards))
                        shards.append({})
                        size = 0
                    shards[-1][n] = v.contiguous()
                    size += v.numel() * v.element_size()
                    count += 1
                progress(min(done, total), total)
            ckpt.close()
        written += _flush(out, shards, len(shards))
    finally:
        ckpt.close()
    _write_index(out, shards, written)
    _copy_the_rest(root, out, s)
    progress(total, total)
    return {"tensors": count, "bytes_in": total, "bytes_out": written, "peak_host_bytes": peak_host_bytes()}


def _converted(name: str, t: torch.Tensor, s: QuantSpec) -> dict[str, torch.Tensor]:
    """The tensors one source tensor becomes: its packed form and scales (zero points), or itself."""
    if name.endswith(".weight") and t.dim() == 2 and is_quantized(name[: -len(".weight")]):
        return {name + suffix: v for suffix, v in quantize(t, s).tensors().items()}
    return {name: t}


def _shard_name(i: int) -> str:
    return f"model-{i:05d}.safetensors"


def _flush(out: Path, shards: list[dict], i: int) -> int:
    """Write the last shard and drop its tensors from memory; returns its bytes."""
    tensors = shards[-1]
    save_file(tensors, str(out / _shard_name(i)), metadata={"format": "pt"})
    nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
    shards[-1] = dict.fromkeys(tensors)  # keep the names for the index
    return nbytes


def _write_index(out: Path, shards: list[dict], total: int):
    weight_map = {n: _shard_name(i + 1) for i, names in enumerate(shards) for n in names}
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def _copy_the_rest(root: Path, out: Path, s: QuantSpec):
    """config.json (with its quantization) and the carried files: only regular files of the model directory,
    never what a symlink leads to outside it (`LICENSE -> /etc/shadow`); the hub's layout, where every file
    is a link into the repository's blobs/, is the model directory's own. Modes are the source's, under the
    umask: the directory and every file at most as open as the source's (shards as the strictest shard)."""
    mask = _umask()
    config = json.loads(files.read_text(root / "config.json"))
    config["quantization_config"] = s.config()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    modes = {"config.json": _mode(root / "config.json")}
    own = _own_places(root)
    for f in sorted(root.iterdir()):
        if not any(fnmatch(f.name, pattern) for pattern in CARRIED):
            continue
        target = Path(os.path.realpath(f))
        if not any(target == place or place in target.parents for place in own):
            continue  # a link out of the model directory: not ours to copy
        try:
            st = files.regular(target)
        except OSError:  # a directory, FIFO or device: not a file to carry
            continue
        shutil.copyfile(target, out / f.name)
        modes[f.name] = stat.S_IMODE(st.st_mode)
    shard_mode = 0o666
    for shard in root.glob("*.safetensors"):
        shard_mode &= _mode(shard)
    for f in out.iterdir():
        os.chmod(f, modes.get(f.name, shard_mode) & 0o666 & ~mask)
    os.chmod(out, _mode(root) & 0o777 & ~mask)  # mkdtemp made it private


def _own_places(root: Path) -> list[Path]:
    """Where a model directory's files may be: the directory itself, and for a hub snapshot its blobs/."""
    real = Path(os.path.realpath(root))
    places = [real]
    if real.parent.name == "snapshots":
        places.append(real.parent.parent / "blobs")
    return places


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
