"""The repository's public URL, set in one place: pyproject.toml's `[project.urls] Repository`.

    python tools/repository_url.py                                 # the URL and where it is used
    python tools/repository_url.py https://github.com/OWNER/NAME   # sets it everywhere

The Colab badges (README.md, docs/, notebooks/), the notebooks' clone URL (`REPO_URL`) and
CITATION.cff follow it; `tests/test_docs.py` checks that they agree. Until bcl_jax has a public
home the URL is a placeholder, and the badges and the notebooks' clone cell lead nowhere.
"""

from __future__ import annotations

import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
GITHUB = re.compile(r'^https://github\.com/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)$')


def current(root: pathlib.Path = ROOT) -> str:
    with open(root / 'pyproject.toml', 'rb') as f:
        return tomllib.load(f)['project']['urls']['Repository']


def owner_and_name(url: str) -> str:
    """'OWNER/NAME' of a GitHub URL (Colab opens notebooks from GitHub only)."""
    match = GITHUB.match(url)
    if not match:
        raise ValueError(f'{url!r} is not https://github.com/OWNER/NAME')
    return '/'.join(match.groups())


def files(root: pathlib.Path = ROOT) -> list[pathlib.Path]:
    """The files that name the repository."""
    found = [root / 'pyproject.toml', root / 'README.md', root / 'CITATION.cff']
    return (
        found + sorted((root / 'docs').glob('*.md')) + sorted((root / 'notebooks').glob('*.ipynb'))
    )


def forms(url: str) -> tuple[str, str]:
    """How a file names the repository: github.com/OWNER/NAME, and the Colab badges' path."""
    repo = owner_and_name(url)
    return f'github.com/{repo}', f'colab.research.google.com/github/{repo}/'


def set_url(new: str, root: pathlib.Path = ROOT) -> list[pathlib.Path]:
    """Replaces the current URL (both forms) by `new` in every file; returns the files changed."""
    replacements = list(zip(forms(current(root)), forms(new)))
    changed = []
    for path in files(root):
        text = updated = path.read_text()
        for old_form, new_form in replacements:
            updated = updated.replace(old_form, new_form)
        if updated != text:
            path.write_text(updated)
            changed.append(path)
    return changed


def main(argv: list[str]) -> int:
    if len(argv) > 2:
        print(__doc__, file=sys.stderr)
        return 2
    if len(argv) == 2:
        for path in set_url(argv[1]):
            print('updated', path.relative_to(ROOT))
    url = current()
    print(url)
    for path in files():
        if any(form in path.read_text() for form in forms(url)):
            print('  used in', path.relative_to(ROOT))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
