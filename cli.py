"""How a script runs, off the reading path: its flags, its processes, its errors.

    config = parse_config(VCPTrainConfig, argv)   # typed --key=value flags into the config dataclass
    dist = setup_distributed(config.device)       # under torchrun: join the process group -> Dist
    cli(main, sys.argv[1:])                       # a script's __main__: a user error is one line

Flag types: int, float, str, bool and Optional[X], what the configs use.
"""

import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from errors import UserError

# ----------------------------------------------------------------------------- flags

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _optional_of(tp):
    """X for Optional[X], else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None))
    return None


def _type_name(tp) -> str:
    if _optional_of(tp) is not None:
        return f"{_type_name(_optional_of(tp))} or none"
    if tp is bool:
        return "bool (true/false/1/0/yes/no)"
    return getattr(tp, "__name__", str(tp))


def _parse_value(key: str, text: str, tp):
    """`text` as a value of type `tp`; a ValueError naming the flag and the expected type."""
    bad = UserError(f"--{key}={text}: expected {_type_name(tp)}")
    if _optional_of(tp) is not None:
        if text.strip().lower() in ("none", "null", ""):
            return None
        try:
            return _parse_value(key, text, _optional_of(tp))
        except ValueError:
            raise bad from None
    if tp is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise bad
    if tp is int:
        try:
            return int(text)
        except ValueError:
            try:                                          # 1e4 is a fine way to write 10000
                f = float(text)
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
            raise bad from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise bad from None
    if tp is str:
        return text
    raise TypeError(f"parse_config: field {key} has the unsupported type {tp} (int, float, str, bool, Optional)")


def config_help(cls) -> str:
    """One line per field: flag, type, default (and `metadata={"help": ...}` when a field has it)."""
    hints = typing.get_type_hints(cls)
    lines = [f"options of {cls.__name__} (--key=value or --key value):"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f"default {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"default {f.default_factory()!r}"
        else:
            default = "required"
        help_ = f"  {f.metadata['help']}" if "help" in f.metadata else ""
        lines.append(f"  --{f.name:<20} {_type_name(hints[f.name]):<32} {default}{help_}")
    return "\n".join(lines)


def parse_config(cls, argv: Optional[list] = None):
    """`--key=value` / `--key value` flags (argv defaults to sys.argv[1:]) into `cls(...)`.

    Types follow the field annotations: int, float, str, bool (true/false/1/0/yes/no; a bare
    `--flag` is true), Optional[X] ("none" is None). `-h`/`--help` prints the fields and exits.
    Unknown keys and bad values raise a one-line ValueError (the valid keys / the expected type).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    values = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            print(config_help(cls))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: options are written --key=value")
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in names:
            raise UserError(f"unknown option --{key}; valid options: " + " ".join(f"--{n}" for n in names))
        if not eq:
            nxt = argv[i] if i < len(argv) else None
            if hints[key] is bool and (nxt is None or nxt.lower() not in _TRUE + _FALSE):
                text = "true"                                 # bare --flag
            elif nxt is None or nxt.startswith("--"):
                raise UserError(f"--{key} needs a value ({_type_name(hints[key])})")
            else:
                text, i = nxt, i + 1
        values[key] = _parse_value(key, text, hints[key])
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError("missing required option(s): " + " ".join(f"--{n}=..." for n in missing))
    return cls(**values)


def config_from_dict(cls, d: dict):
    """Rebuild a config from its config.json dict; unknown keys are an error."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls) if f.init})
    if unknown:
        raise UserError(f"{cls.__name__}: unknown key(s) {', '.join(unknown)}")
    return cls(**d)


def flags_of(cls, names: dict) -> list:
    """`cls`'s fields as `dataclasses.make_dataclass` fields under other names ({flag: field}):
    a script's flags that are a model config's fields, declared once, in the model's config.
    A float field's default is a float, as the flag's parsed value would be."""
    hints, by_name = typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    return [(flag, hints[name], dataclasses.field(
             default=float(by_name[name].default) if hints[name] is float else by_name[name].default))
            for flag, name in names.items()]


# ----------------------------------------------------------------------------- processes

@dataclass
class Dist:
    """Where this process stands: rank, world_size, local_rank, device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    def barrier(self):
        if self.ddp:
            torch_dist.barrier()

    def log(self, *args):
        """print on rank 0 only (through tqdm, so a progress bar is not torn)."""
        if self.is_main:
            tqdm.write(" ".join(str(a) for a in args))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device={device}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={device}: CUDA is not available on this machine (use --device=cpu)")
    return dev


def setup_distributed(device: str = "auto") -> Dist:
    """Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set): join the process group, NCCL with one
    GPU per process (cuda:LOCAL_RANK) or gloo on CPU. Otherwise a single process on `device`.
    `cli` leaves the group when the script ends."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(device=resolve_device(device))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not torch_dist.is_initialized():
        # rank 0 writes checkpoints while the others wait in a barrier: allow a long save
        kwargs = dict(device_id=dev) if dev.type == "cuda" else {}
        torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                      timeout=timedelta(minutes=30), **kwargs)
    return Dist(rank, world_size, local_rank, dev)


# ----------------------------------------------------------------------------- errors

def cli(main: Callable, argv: Optional[list] = None):
    """Run `main(argv)` as a command: an error the user caused (errors.UserError: a flag, a file,
    a row, a checkpoint that does not fit, a diverged run) prints one line `error: ...` and
    exits 1; anything else is a bug and shows its traceback.
    LLAVA_SLT_DEBUG=1 shows the traceback always. The process group, if any, is torn down."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except UserError as e:
        if os.environ.get("LLAVA_SLT_DEBUG"):
            raise
        msg = str(e)
        if "\nOriginal Traceback" in msg:
            # raised in a DataLoader worker: torch re-raises it with the worker's traceback in the
            # message; its last line is the error itself ("module.Error: message")
            msg = msg.rstrip().splitlines()[-1].split(": ", 1)[-1]
        print(f"error: {msg}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    finally:
        if torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.destroy_process_group()   # joined by setup_distributed
