"""Fetch the labelled real volumes that evaluate-gru uses, at set-up time (never committed).

- pyradiomics' test data ``lung2_image.nrrd`` + ``lung2_label.nrrd`` (CT lung tumour; the repository is BSD-3, the
  data's clinical origin is not stated), taken out of the ``pyradiomics-bhklab`` 3.1.4 source distribution on PyPI
  and checked against their MD5 sums.
- The MNI152 masks come from nilearn itself (``pip install nilearn``), which ships them.

Usage: python scripts/fetch_eval_data.py [DEST]  (default .cache/eval-data)
"""
from __future__ import annotations

import hashlib
import json
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from segvolgru.files import write_atomic

PACKAGE, VERSION = "pyradiomics-bhklab", "3.1.4"
MD5 = {"lung2_image.nrrd": "b5303f92aad2cbeec9a562e7d4eb594d", "lung2_label.nrrd": "db079743b5dbb9d0006bd26c82ca41d1"}


def main() -> int:
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/eval-data")
    dest.mkdir(parents=True, exist_ok=True)
    if all((dest / n).exists() and hashlib.md5((dest / n).read_bytes()).hexdigest() == m for n, m in MD5.items()):
        print(f"lung2 already in {dest}")
        return 0
    meta = json.load(urllib.request.urlopen(f"https://pypi.org/pypi/{PACKAGE}/json", timeout=60))
    sdist = next(u for u in meta["releases"][VERSION] if u["packagetype"] == "sdist")
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / sdist["filename"]
        urllib.request.urlretrieve(sdist["url"], archive)
        if hashlib.sha256(archive.read_bytes()).hexdigest() != sdist["digests"]["sha256"]:
            print(f"{archive.name}: SHA-256 differs from PyPI's; not extracted", file=sys.stderr)
            return 1
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in MD5 and "/data/" in member.name:
                    data = tar.extractfile(member).read()
                    write_atomic(dest / name, lambda temporary, data=data: temporary.write_bytes(data))
    for name, md5 in MD5.items():
        got = hashlib.md5((dest / name).read_bytes()).hexdigest()
        if got != md5:
            print(f"{name}: MD5 {got} != {md5}", file=sys.stderr)
            return 1
    print(f"lung2 image and label in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
