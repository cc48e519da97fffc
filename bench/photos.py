"""Fetch the clean photographs for pretraining and evaluation from Debian's packages.

    python bench/photos.py DIR

writes DIR/train/ and DIR/heldout/ (evaluation only: never train on it) and
DIR/LICENSES.txt. Sources and licences: ../shared/data/PHOTOS.md. Illustrations were
left out by eye. The held-out photos (and the bundled demo sample, cut from
budgie/tea-gardens.jpg, CC0) are never used for training.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BOOKWORM = ["mate-backgrounds", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04"]
TRIXIE = ["budgie-backgrounds", "plasma-workspace-wallpapers"]

B = "usr/share/backgrounds/"
W = "usr/share/wallpapers/"
PLASMA = ["BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow",
          "FallenLeaf", "Kite", "OneStandsOut", "Path", "summer_1am"]

# relative path in the unpacked packages -> (set, licence)
PHOTOS: dict[str, tuple[str, str]] = {}
for name in ["beacon-street-sunset", "blue-periwinkle", "canyon-wren", "extreme-desert-hike",
             "high-trestle-trail", "oakland-zoo-otters", "perched-osprey", "piazza-gae-aulenti",
             "roman-colosseum", "singaporean-cityscape"]:
    PHOTOS[f"{B}budgie/{name}.jpg"] = ("train", "CC0-1.0 (budgie-backgrounds)")
for name in ["casa-mila", "lake-sherburne", "tea-gardens"]:
    PHOTOS[f"{B}budgie/{name}.jpg"] = ("heldout", "CC0-1.0 (budgie-backgrounds)")
for name in ["Dragonfly_by_Bolly", "Picture_0B_by_freespace", "Picture_1A_by_freespace",
             "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi", "analogpattern_by_Peter_Nerlich",
             "friends_by_Aitzol_Berasategi", "life_by_Aitzol_Berasategi",
             "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt",
             "sunset_by_Aitzol_Berasategi"]:
    PHOTOS[f"{B}{name}.jpg"] = ("train", "CC-BY-4.0 / CC-BY-SA-4.0 (lomiri-wallpapers-16.04)")
PHOTOS[f"{B}Bridge_by_Sander_Klootwijk.jpg"] = ("heldout",
                                                "CC-BY-4.0 / CC-BY-SA-4.0 (lomiri-wallpapers-16.04)")
PHOTOS[f"{B}Kleiber_by_Lukas_Baubkus.jpg"] = ("heldout", "CC-BY-SA (lomiri-wallpapers-20.04)")
for name in ["Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "RainDrops",
             "Storm", "TwoWings", "YellowFlower"]:
    PHOTOS[f"{B}mate/nature/{name}.jpg"] = ("train", "GPL-2+ (mate-backgrounds)")
for name in ["Wood", "LadyBird"]:
    PHOTOS[f"{B}mate/nature/{name}.jpg"] = ("heldout", "GPL-2+ (mate-backgrounds)")
PLASMA_LICENCE = "LGPL-3 / CC-BY-SA-4.0 (plasma-workspace-wallpapers)"
for name in PLASMA:
    split = "heldout" if name in ("Path", "Kite") else "train"
    PHOTOS[f"{W}{name}/contents/images/2560x1600.jpg"] = (split, PLASMA_LICENCE)
PHOTOS[f"{W}Mountain/contents/images_dark/5120x2880.png"] = ("train", PLASMA_LICENCE)


def _apt(args: list[str], cwd: Path) -> None:
    subprocess.run(["apt-get", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def download(work: Path) -> Path:
    debs = work / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    _apt(["update", "-qq"], debs)
    _apt(["download", *BOOKWORM], debs)
    state = work / "apt13"
    (state / "lists/partial").mkdir(parents=True, exist_ok=True)
    (state / "cache/archives/partial").mkdir(parents=True, exist_ok=True)
    (state / "sources.list").write_text("deb http://deb.debian.org/debian trixie main\n")
    opts = ["-o", f"Dir::Etc::SourceList={state}/sources.list", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={state}/lists", "-o", f"Dir::Cache={state}/cache"]
    _apt([*opts, "update", "-qq"], debs)
    _apt([*opts, "download", *TRIXIE], debs)
    unpacked = work / "unpacked"
    for deb in debs.glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True)
    return unpacked


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--unpacked", type=Path, help="already unpacked packages (skip the download)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.unpacked or download(Path(tmp))
        lines = []
        for rel, (split, lic) in sorted(PHOTOS.items()):
            src = root / rel
            if not src.is_file():
                print(f"missing: {rel}", file=sys.stderr)
                continue
            name = rel.replace("usr/share/", "").replace("/contents/images_dark/", "-").replace(
                "/contents/images/", "-").replace("/", "_")
            dst = args.out / split / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            lines.append(f"{split}/{name}\t{lic}\t/{rel}")
        (args.out / "LICENSES.txt").write_text("\n".join(lines) + "\n")
    print(f"{sum(1 for v in PHOTOS.values() if v[0] == 'train')} train, "
          f"{sum(1 for v in PHOTOS.values() if v[0] == 'heldout')} held out -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
