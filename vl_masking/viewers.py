"""Where the two offline viewers are: `mask-impact-viewers` (or `python -m vl_masking viewers`) prints the path
of each page, to open in a browser (nothing is served; the pages load nothing from the network).

In a checkout the pages sit at the repository's top; `pip install .` puts them, with viewer/common.js, its
stylesheet and the vendored Parquet reader, under PREFIX/share/mask-impact/ (pyproject's data-files).
"""

import site
import sys
from pathlib import Path

PAGES = ("visualize_results.html", "visualize_vl_grid.html")
SHARE = Path("share") / "mask-impact"


def viewer_directory() -> Path | None:
    """The first place that holds both pages and their scripts: the checkout, then the installed copies."""
    places = [Path(__file__).resolve().parent.parent, Path(sys.prefix) / SHARE, Path(site.USER_BASE or "") / SHARE]
    for place in places:
        if all((place / page).is_file() for page in PAGES) and (place / "viewer" / "common.js").is_file():
            return place
    return None


def command() -> None:
    place = viewer_directory()
    if place is None:
        print("error: the viewer pages are not installed here (reinstall with pip install .)", file=sys.stderr)
        sys.exit(2)
    for page in PAGES:
        print((place / page).as_uri())


if __name__ == "__main__":
    command()
