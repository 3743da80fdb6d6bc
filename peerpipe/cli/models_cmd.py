"""``peerpipe models``: the models this machine holds, and ``models rm NAME`` to free space."""

from __future__ import annotations

import argparse
import json

GB = 1e9


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models this machine holds (rm NAME frees space)", description=run.__doc__)
    p.add_argument("action", nargs="?", choices=["list", "rm"], default="list", help="list (the default), or rm NAME")
    p.add_argument("name", nargs="?", help="with rm: the model to remove, as the list names it")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """List the bundled and packaged models, folders and GGUF files used before, Ollama's models and
    the Hugging Face cache, and layers fetched from rooms' peers, with sizes and the name --model
    takes. ``rm NAME`` deletes a Hugging Face cache entry or fetched layers, or forgets a folder used before (its files are left alone)."""
    from peerpipe.errors import PeerpipeError
    from peerpipe.models.catalog import catalog, remove

    if args.action == "rm":
        if not args.name:
            raise PeerpipeError("models rm needs the NAME of a model, as `peerpipe models` lists it")
        held = remove(args.name)
        deleted = held.source in ("hub", "fetched")
        freed = "deleted" if deleted else "forgotten (its files are yours, left in place)"
        print(f"{held.name}: {freed}, {held.bytes / GB:.2f} GB" if deleted else f"{held.name}: {freed}")
        return 0
    found = catalog()
    if args.json:
        print(json.dumps({"models": [{"name": h.name, "source": h.source, "path": str(h.path), "bytes": h.bytes} for h in found]}))
        return 0
    header = "name (for --model)"
    width = max(len(header), *(len(h.name) for h in found))
    print(f"{header:<{width}}  {'from':<8} {'GB':>7}  path")
    for h in found:
        print(f"{h.name:<{width}}  {h.source:<8} {h.bytes / GB:>7.2f}  {h.path}")
    if any(h.source == "fetched" for h in found):
        # Their names are for `models rm`: a room's copy is run by joining its room, not with --model.
        print("(fetched: layers this machine fetched from a room's peers; a join uses them again, "
              "`peerpipe models rm NAME` frees them)")
    return 0
