"""``python -m kvbench.methods``: rewrite the capacity table (what ``budget=`` bounds for each method)
in README.md and docs/architecture.md from the methods' declarations."""

from pathlib import Path

from kvbench.methods import write_capacity_tables

#: the documents that show the capacity table, relative to the repository root
DOCS = ("README.md", "docs/architecture.md")

if __name__ == "__main__":
    root = Path(__file__).resolve().parents[2]
    for path in write_capacity_tables([root / doc for doc in DOCS]):
        print(f"rewrote the capacity table in {path}")
