"""The numbers a results/<sweep>/README.md quotes, generated from its law.json so they cannot drift from it.

A README marks its table with `<!-- law.json: LAW.COEF LAW.COEF ... -->` and `<!-- end law.json -->`;
the export rewrites the lines between them from the law.json it writes beside it (as does `python -m
fitting.report results/<sweep>/README.md`), and tests/test_trust.py checks that every README's table equals what this would write.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from fitting.lawfile import read

MARK = re.compile(r"<!-- law\.json: (?P<keys>[^>]*?) -->\n(?P<body>.*?)<!-- end law\.json -->", re.S)
LABELS = {"a": "a (N_opt ∝ C^a)", "b": "b (D_opt ∝ C^b)"}


def coefficient_row(doc: dict, key: str) -> str:
    """One table row: law, coefficient, value and 95% interval, or why the data do not identify it."""
    law, coef = key.split(".", 1)
    section = doc["laws"][law]
    values = {**section["params"], **section.get("derived", {})}
    cis = {**section["ci"], **section.get("derived_ci", {})}
    why = section.get("not_identified", {}).get(coef)
    if why:
        return f"| {law} | {LABELS.get(coef, coef)} | not identified | {why} |"
    ci = cis.get(coef)
    return f"| {law} | {LABELS.get(coef, coef)} | {values[coef]:.3g} | " + (f"[{ci[0]:.3g}, {ci[1]:.3g}] |" if ci else "- |")


def table(doc: dict, keys: list[str]) -> str:
    replicates = next((s["bootstrap"]["replicates"] for s in doc["laws"].values() if "bootstrap" in s), 0)
    head = f"| law | coefficient | value | 95% interval (bootstrap, {replicates} replicates) |\n|---|---|---|---|\n"
    return head + "".join(coefficient_row(doc, k) + "\n" for k in keys)


def render(readme: str, doc: dict) -> str:
    """The README text with every marked table regenerated from the law file."""
    return MARK.sub(lambda m: f"<!-- law.json: {m['keys']} -->\n{table(doc, m['keys'].split())}<!-- end law.json -->",
                    readme)


def update(readme: Path, doc: dict) -> None:
    """Regenerate a README's marked tables in place (the export calls this after writing law.json)."""
    if readme.is_file():
        readme.write_text(render(readme.read_text(), doc))


def main(argv: list[str]) -> int:
    for path in map(Path, argv):
        update(path, read(path.parent / "law.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
