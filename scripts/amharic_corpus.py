"""Rebuild fidel's real-Amharic test corpus from the Amharic translations shipped in Debian packages.

    python scripts/amharic_corpus.py --out /tmp/amharic            # all lines + sources.json
    python scripts/amharic_corpus.py --out tests/data/amharic --excerpt 400

Each package is fetched with `apt-get download` (run `apt-get update` first), unpacked with `dpkg-deb -x`,
and every am .mo file inside is read: its translated strings (msgstr), written by the package's Amharic
translators, are the text. sources.json records package, version, file, licence and line count per file.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = (
    "iso-codes", "libglib2.0-data", "libgtk-3-common", "libgtk2.0-common", "gnome-desktop3-data",
    "evolution-data-server-common", "gnome-control-center-data", "nautilus-data", "at-spi2-common",
    "software-properties-common", "libpam-runtime", "baobab", "eog", "file-roller", "gdm3", "gedit-common",
    "gimp-data", "gnome-calculator", "gnome-panel-data", "gnome-session-common", "gnome-system-monitor",
    "gnome-terminal-data", "gnumeric-common", "gucharmap", "libgweather-4-common", "metacity-common",
    "mutter-common", "rhythmbox-data", "thunar-data", "totem-common", "xfce4-panel", "yelp", "zenity-common",
)
MARKUP = re.compile(r"<[^>]+>|%\d*\$?[sdiuf]|_(?=\w)")  # tags, printf slots, mnemonic underscores are not text


def mo_strings(data: bytes) -> list[str]:
    """The translated strings of a GNU .mo file (both byte orders), header entry left out."""
    magic = struct.unpack("<I", data[:4])[0]
    order = "<" if magic == 0x950412DE else ">"
    _, count, _, trans_offset = struct.unpack(order + "4I", data[4:20])
    strings = []
    for i in range(count):
        length, offset = struct.unpack(order + "2I", data[trans_offset + 8 * i: trans_offset + 8 * i + 8])
        text = data[offset:offset + length].decode("utf-8", errors="replace")
        if not text.startswith("Project-Id-Version"):
            strings.extend(text.split("\0"))  # plural forms are separated by NUL
    return strings


def text_lines(strings: list[str]) -> list[str]:
    lines = []
    for s in strings:
        for line in MARKUP.sub("", s).splitlines():
            line = " ".join(line.split())
            if any("\u1200" <= ch <= "\u137f" for ch in line):
                lines.append(line)
    return lines


def licence_of(root: Path, package: str) -> str:
    copyright_file = root / "usr/share/doc" / package / "copyright"
    if not copyright_file.is_file():
        return "see the package's /usr/share/doc/<package>/copyright"
    found = re.findall(r"^License:\s*(\S.*)$", copyright_file.read_text(errors="replace"), re.M)
    return ", ".join(dict.fromkeys(found)) or "see copyright file"


def package_version(deb: Path) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                          text=True).stdout.strip()


def collect(packages: tuple[str, ...], work: Path) -> tuple[list[str], list[dict]]:
    lines, sources = [], []
    for package in packages:
        subprocess.run(["apt-get", "download", "-q", package], cwd=work, check=True, capture_output=True)
        deb = next(work.glob(f"{package}_*.deb"))
        root = work / package
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        for mo in sorted(root.glob("usr/share/locale/am/LC_MESSAGES/*.mo")):
            file_lines = text_lines(mo_strings(mo.read_bytes()))
            lines.extend(file_lines)
            sources.append({"package": package, "version": package_version(deb), "file": "/" +
                            str(mo.relative_to(root)), "licence": licence_of(root, package),
                            "lines": len(file_lines)})
    return list(dict.fromkeys(lines)), sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for amharic.txt and sources.json")
    parser.add_argument("--excerpt", type=int, default=0, help="keep every k-th line so this many remain")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            lines, sources = collect(PACKAGES, Path(tmp))
        except subprocess.CalledProcessError as e:
            print(f"{' '.join(e.cmd)}: failed ({(e.stderr or b'').decode(errors='replace').strip()[-200:]})",
                  file=sys.stderr)
            return 2
    if args.excerpt:
        step = max(1, len(lines) // args.excerpt)
        lines = lines[::step][:args.excerpt]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "amharic.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (args.out / "sources.json").write_text(json.dumps(sources, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
    print(f"{len(lines)} lines from {len(sources)} files in {len(PACKAGES)} packages -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
