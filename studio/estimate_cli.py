"""``studio estimate SPEC``: how much memory a run will take, before it is launched.

Reads the spec like ``studio train`` (same ``--set`` overrides), builds nothing but the
model's skeleton, and prints the predicted peak with its parts; ``--json`` prints the
estimator's whole answer for tools.
"""
from __future__ import annotations

import json

PARTS = (("weights", "frozen base weights as held (quantized, memory-mapped)"),
         ("trainable", "parameters that train"),
         ("gradients", "their gradients"),
         ("optimizer_state", "update rule state and its temporaries"),
         ("activations", "kept for backward (first, longest batch)"),
         ("logits", "one loss chunk over the vocabulary"),
         ("gathered", "FSDP2: the root and largest block gathered beyond the shards"),
         ("framework_overhead", "process, libraries, tokenizer, allocator"))


def add_estimate_command(subparsers) -> None:
    p = subparsers.add_parser("estimate", help="predict a run's peak memory from its spec, without loading weights")
    p.add_argument("spec", help="YAML or JSON spec file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a spec field, e.g. --set training.batch_size=16 (repeatable)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="estimate for this device (default: the one the run would use here)")
    p.add_argument("--no-data", action="store_true",
                   help="do not read the dataset: assume every row is training.max_seq_len tokens long")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_estimate)


def cmd_estimate(args) -> int:
    from jobs.estimate.estimator import estimate
    from jobs.spec import load_spec

    spec = load_spec(args.spec, args.set)
    result = estimate(spec, args.device, use_data=not args.no_data)
    print(json.dumps(result, indent=2) if args.json else format_estimate(result))
    return 0


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def format_estimate(result: dict) -> str:
    total = result["total_bytes"]
    ranks = result.get("world_size", 1)
    per = f" per rank ({ranks} ranks, sharding {result.get('sharding', 'none')})" if ranks > 1 else ""
    lines = [f"Predicted peak memory: {human(total)}{per} on {result['device']} ({result['dtype']}), "
             f"{result['method']} + {result['optimizer']}, {result['trainable_params']:,} trainable values", ""]
    for key, meaning in PARTS:
        value = result["breakdown"].get(key, 0)
        share = 100 * value / total if total else 0.0
        lines.append(f"  {key:<19} {human(value):>11} {share:5.1f}%  {meaning}")
    lines.append(f"  {'total':<19} {human(total):>11}")
    phases = ", ".join(f"{name} {human(value)}" + (" (peak)" if name == result["peak_phase"] else "")
                       for name, value in result["phases"].items())
    lines += ["", f"phases: {phases}", "assumptions:"]
    lines += [f"  - {note}" for note in result["assumptions"]]
    return "\n".join(lines)
