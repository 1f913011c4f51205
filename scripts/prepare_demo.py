"""Lay out the demo: the caltech101-22 sample as a gallery, holding out one photo per class as a query."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from lookalike.pipeline.datasets import load_labelled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--zip", required=True, help="caltech101-22.zip (or any labelled folder/zip)")
    parser.add_argument("--out", required=True, help="demo folder: gallery/ and queries/ are made inside")
    args = parser.parse_args()
    data = load_labelled(args.zip)
    out = Path(args.out)
    held_out = set()
    for label in sorted(set(data.labels)):
        first = data.paths[data.labels.index(label)]
        held_out.add(first)
        query = out / "queries" / f"{label}{Path(first).suffix}"
        query.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data.root / first, query)
    for path, label in zip(data.paths, data.labels):
        target = out / "gallery" / label / Path(path).name
        if path not in held_out and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(data.root / path)
    print(f"demo gallery: {len(data) - len(held_out)} images in {out / 'gallery'}; "
          f"{len(held_out)} held-out queries in {out / 'queries'}")


if __name__ == "__main__":
    main()
