"""The documentation: README.md and docs/*.md link only to files of the repository, every
`method.md §N` reference in the code, configs, tests, scripts, notebooks and docs names a section
of docs/method.md, the README stays short and keeps the Quick start commands that CI runs, and
LICENSE and CITATION.cff are there."""

import glob
import json
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(REPO, 'README.md'), *sorted(glob.glob(os.path.join(REPO, 'docs', '*.md')))]
SKIP_DIRS = {'.git', 'runs', '__pycache__', '.pytest_cache', 'node_modules'}
SOURCE_EXTS = ('.py', '.md', '.sh', '.ipynb')
QUICK_START = (
    (
        'pip install -r requirements.txt && python -m bcl_jax.main --config=configs/synthetic.py'
        ' --workdir=runs/synthetic'
    ),
    (
        'pip install -r requirements.txt -r requirements-test.txt'
        ' && pip install --no-deps -r requirements-onnx.txt && python -m pytest'
    ),
)

_FENCE = re.compile(r'^(```|~~~).*?^\1[^\n]*$', re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r'(`+)(?:(?!\1).)+?\1', re.DOTALL)
_INLINE_LINK = re.compile(r'\]\(\s*<?([^)\s>]+)>?(?:\s+(?:"[^"]*"|\'[^\']*\'|\([^)]*\)))?\s*\)')
_REF_LINK = re.compile(r'^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)')
_HTML_LINK = re.compile(
    r'<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["\']([^"\']+)["\']', re.IGNORECASE
)
_SECTION = re.compile(r'^## (\d+)\.', re.MULTILINE)
_NUMBER = r'§\s*\d+(?:\.\d+)*'
_REFERENCE = re.compile(rf'method\.md\s*{_NUMBER}(?:\s*(?:[-–—]|and|or|to|,)\s*{_NUMBER})*')


def _rel(path):
    return os.path.relpath(path, REPO)


def _links(text):
    """The link targets of a markdown text, outside code blocks and code spans."""
    text = _CODE_SPAN.sub('', _FENCE.sub('', text))
    references, previous = [], ''  # a reference definition cannot continue a paragraph
    for line in text.splitlines():
        match = _REF_LINK.match(line)
        if match and (not previous.strip() or _REF_LINK.match(previous)):
            references.append(match.group(1))
        previous = line
    return [*_INLINE_LINK.findall(text), *references, *_HTML_LINK.findall(text)]


def _external(target):
    return re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*:', target) is not None  # http:, https:, mailto:


def _source_files():
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(
            d for d in dirs if d not in SKIP_DIRS and not (d.startswith('.') and d != '.ci')
        )
        for name in sorted(files):
            if name.endswith(SOURCE_EXTS):
                yield os.path.join(root, name)


def _text(path):
    with open(path, encoding='utf-8') as f:
        text = f.read()
    if path.endswith('.ipynb'):  # the cells' sources, whatever the JSON escapes
        cells = json.loads(text).get('cells', [])
        text = '\n'.join(
            ''.join(c['source']) if isinstance(c['source'], list) else c['source'] for c in cells
        )
    return text


def _sections():
    with open(os.path.join(REPO, 'docs', 'method.md'), encoding='utf-8') as f:
        return {int(n) for n in _SECTION.findall(f.read())}


def _referenced_sections(text):
    """Every section number of every `method.md §N` reference: §N.M names section N, and a
    range §N-§M names N, M and the sections between."""
    for match in _REFERENCE.finditer(text):
        numbers = [int(n) for n in re.findall(r'§\s*(\d+)', match.group(0))]
        spans = re.split(r'\s*(?:[-–—]|to)\s*', match.group(0))
        wanted = set(numbers)
        if len(spans) > 1 and len(numbers) == 2 and numbers[0] <= numbers[1]:
            wanted |= set(range(numbers[0], numbers[1] + 1))
        yield match.group(0), sorted(wanted)


def test_markdown_finds_links():
    text = (
        '[a](docs/a.md) ![b](figures/b.png "title") [c](https://x.org) [d](#top)\n'
        '[![badge](https://x.org/b.svg)](https://x.org) `[e](code.md)`\n'
        '```\n[f](fenced.md)\n```\n\n[g]: ref.md\n<img src="img.png">\n'
        'a paragraph\n  [1, 2]: not a reference\n'
    )
    assert sorted(_links(text)) == sorted(
        [
            'docs/a.md',
            'figures/b.png',
            'https://x.org',
            '#top',
            'https://x.org/b.svg',
            'https://x.org',
            'ref.md',
            'img.png',
        ]
    )


def test_method_references_are_parsed():
    text = 'method.md §4, method.md §3-§6, (method.md §4–§5) method.md §9 and §4, method.md §7.2'
    assert [w for _, w in _referenced_sections(text)] == [[4], [3, 4, 5, 6], [4, 5], [4, 9], [7]]


@pytest.mark.parametrize('doc', DOCS, ids=_rel)
def test_relative_links_resolve_inside_the_repository(doc):
    with open(doc, encoding='utf-8') as f:
        links = _links(f.read())
    bad = []
    for target in links:
        if _external(target) or target.startswith('#'):
            continue
        path = target.split('#', 1)[0].split('?', 1)[0]
        base = REPO if path.startswith('/') else os.path.dirname(doc)
        resolved = os.path.realpath(os.path.join(base, path.lstrip('/')))
        if os.path.commonpath([resolved, os.path.realpath(REPO)]) != os.path.realpath(REPO):
            bad.append(f'{target}: outside the repository')
        elif not os.path.exists(resolved):
            bad.append(f'{target}: no such file')
    assert not bad, f'{_rel(doc)}: ' + '; '.join(bad)


def test_method_references_name_existing_sections():
    sections = _sections()
    assert sections == set(range(1, max(sections) + 1)), sorted(sections)
    bad = []
    for path in _source_files():
        for reference, numbers in _referenced_sections(_text(path)):
            missing = [n for n in numbers if n not in sections]
            if missing:
                bad.append(f'{_rel(path)}: {reference!r} (no section {missing})')
    assert not bad, '\n'.join(bad)


def test_nothing_refers_to_the_spec_outside_the_repository():
    bad = [
        _rel(path)
        for path in _source_files()
        if re.search(r'M[E]THOD(?:\.md| §)|\.\./shared/', _text(path))
    ]
    assert not bad, f'refer to docs/method.md instead: {bad}'


def test_readme_is_short_and_keeps_the_quick_start():
    with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    assert len(text.splitlines()) <= 200
    quick_start = text[text.index('## Quick start') :]
    first_lines = [line.strip() for line in quick_start.splitlines() if line.startswith('    ')]
    assert tuple(first_lines[:2]) == QUICK_START


def test_license_and_citation():
    with open(os.path.join(REPO, 'LICENSE'), encoding='utf-8') as f:
        license_text = f.read()
    assert 'Apache License' in license_text and 'Version 2.0, January 2004' in license_text
    with open(os.path.join(REPO, 'CITATION.cff'), encoding='utf-8') as f:
        cff = f.read()
    try:
        import yaml
    except ImportError:  # PyYAML is not a requirement: check the keys line by line
        keys = {line.split(':', 1)[0] for line in cff.splitlines() if re.match(r'^[\w-]+:', line)}
        assert {'cff-version', 'title', 'authors', 'message', 'preferred-citation'} <= keys
        assert re.search(r'^cff-version:\s*"?1\.2\.0"?\s*$', cff, re.MULTILINE)
    else:
        data = yaml.safe_load(cff)
        assert data['cff-version'] == '1.2.0'
        assert data['title'] and data['authors'] and data['message']
        cited = data['preferred-citation']
        assert cited['type'] == 'article' and cited['authors'] and cited['title']


# ----------------------------------------------------------------------------------------------
# The repository URL: one setting (tools/repository_url.py)
# ----------------------------------------------------------------------------------------------


def _repository_url_tool():
    import importlib.util

    path = os.path.join(REPO, 'tools', 'repository_url.py')
    spec = importlib.util.spec_from_file_location('repository_url', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_badge_and_clone_url_is_the_one_setting():
    tool = _repository_url_tool()
    url = tool.current()
    # Any GitHub repository or Colab-from-GitHub path these files name, other than the setting's.
    named = re.compile(r'(?:github\.com|colab\.research\.google\.com/github)/([\w.-]+/[\w.-]+)')
    for path in tool.files():
        for repo in set(named.findall(path.read_text())) - {'OWNER/NAME'}:  # the tool's usage
            assert f'https://github.com/{repo}' == url, f'{path.name} names {repo}, not {url}'
    text = ''.join(p.read_text() for p in tool.files())
    assert text.count(f'colab.research.google.com/github/{tool.owner_and_name(url)}/') >= 6
    assert f"REPO_URL = '{url}'" in text


def test_setting_the_repository_url_rewrites_every_place(tmp_path):
    import shutil

    tool = _repository_url_tool()
    root = tmp_path / 'repo'
    for path in tool.files():
        target = root / path.relative_to(tool.ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    before = {p: p.read_text() for p in tool.files(root)}
    changed = tool.set_url('https://github.com/acme/retrieval', root)
    assert set(changed) == {p for p, t in before.items() if 'bcl-jax/bcl_jax' in t}
    assert tool.current(root) == 'https://github.com/acme/retrieval'
    for path in tool.files(root):
        text = path.read_text()
        assert 'bcl-jax/bcl_jax' not in text
        # Only the repository's names changed: the same text with the old name put back.
        assert text.replace('acme/retrieval', 'bcl-jax/bcl_jax') == before[path]
    with pytest.raises(ValueError, match='OWNER/NAME'):
        tool.set_url('https://gitlab.com/acme/retrieval', root)
