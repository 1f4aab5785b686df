"""Credentials in text: the environment-variable and config forms of API keys, tokens and passwords,
provider tokens by their own shape, private-key blocks. Text comes in pieces (a file streamed in
chunks); a credential across two pieces is still found, with its line number."""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

OVERLAP = 4096  # characters kept from one piece to the next: longer than any credential looked for
CONTEXT = 128   # characters before a scanned region that lookbehinds and the name of an assignment may use

# An assignment `NAME = value` / `"name": "value"` is found from its value (a long run that is not a
# number), then judged by the name before it: tokenizer=, max_tokens=, sha256= are not secrets.
_VALUE = r"""[ \t]*+["']?+[ \t]*+(?=[0-9.]*+[A-Za-z_\-+/=~])([A-Za-z0-9_\-+/=.~]{16,})"""  # possessive: fast
_ASSIGNED = (re.compile("=" + _VALUE), re.compile(":" + _VALUE))  # a literal first char is found fastest
_NAME_REVERSED = re.compile(r"[A-Za-z0-9_-]{1,80}")
_SECRET_NAME = re.compile(r"(?:^|[_-])(?:api[_-]?key|apikey|secret[_-]?key|access[_-]?key|private[_-]?key|auth[_-]?key|"
                          r"(?:auth|access|refresh|bearer|session|bot|api)[_-]?token|client[_-]?secret|"
                          r"secret|password|passwd|token|credentials?)\Z", re.IGNORECASE)
_ENV_KEY = re.compile(r"_KEY\Z")  # FOO_KEY=..., upper case only
_PUBLIC_NAME = re.compile(r"(?i)(?:^|_)(?:gpg|public|pub)_key\Z")  # Docker images set a (public) GPG_KEY
_CODE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+\Z")  # self.tokenizer.eos, com.example.key: attributes, names
_SEGMENTS = re.compile(r"[-_./+=~]")
_MASKED = re.compile(r"(?i)x{4}|\*{3}|your|example|placeholder|changeme|redacted|dummy")

# (what, needle, pattern, value group, character classes the value needs): a pattern runs only over
# text holding its needle (lower-case needles: in the lower-cased text), which keeps the scan fast.
TOKEN_SHAPES: list[tuple[str, str, re.Pattern, int, int]] = [
    ("a private key", "PRIVATE KEY", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"), 0, 0),
    ("a W&B API key", "login", re.compile(r"wandb[ \t]+login[ \t]+(?:--\S+[ \t]+)*((?:local-)?[0-9a-f]{40})(?![0-9a-f])"), 1, 1),
    ("a W&B API key", "api.wandb.ai", re.compile(
        r"machine[ \t]+api\.wandb\.ai\s+login\s+\S+\s+password\s+([0-9a-f]{40})(?![0-9a-f])"), 1, 1),
    ("an Anthropic API key", "sk-ant-", re.compile(r"sk-ant-(?<![A-Za-z0-9_-]sk-ant-)[a-z]+\d*-([A-Za-z0-9_-]{40,})"), 1, 2),
    ("an OpenAI-style API key", "sk-", re.compile(r"sk-(?<![A-Za-z0-9_-]sk-)((?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,})"), 1, 2),
    ("a Hugging Face token", "hf_", re.compile(r"hf_(?<![A-Za-z0-9]hf_)([A-Za-z0-9]{30,})(?![A-Za-z0-9])"), 1, 2),
    ("a GitHub token", "_", re.compile(r"gh[pousr]_(?<![A-Za-z0-9]gh[pousr]_)([A-Za-z0-9]{36,})"), 1, 2),
    ("a GitHub token", "github_pat_", re.compile(r"github_pat_(?<![A-Za-z0-9]github_pat_)([A-Za-z0-9_]{22,})"), 1, 2),
    ("a GitLab token", "glpat-", re.compile(r"glpat-(?<![A-Za-z0-9]glpat-)([A-Za-z0-9_-]{20,})"), 1, 2),
    ("an AWS access key id", "A", re.compile(r"(A(?:KIA|SIA|BIA|CCA)(?<![A-Z0-9]....)[A-Z0-9]{16})(?![A-Z0-9])"), 1, 1),
    ("a Slack token", "xox", re.compile(r"xox(?<![A-Za-z0-9]xox)[abposr]-([A-Za-z0-9-]{10,})"), 1, 2),
    ("a Slack token", "xapp-", re.compile(r"xapp-(?<![A-Za-z0-9]xapp-)(\d-[A-Za-z0-9-]{10,})"), 1, 2),
    ("a Slack webhook URL", "hooks.slack.com", re.compile(r"hooks\.slack\.com/(?:services|workflows|triggers)/([A-Za-z0-9/_-]{20,})"), 1, 2),
    ("a Google API key", "AIza", re.compile(r"AIza(?<![A-Za-z0-9]AIza)([0-9A-Za-z_-]{35})"), 1, 2),
    ("a PyPI token", "pypi-", re.compile(r"pypi-AgE(?<![A-Za-z0-9]pypi-AgE)([A-Za-z0-9_-]{50,})"), 1, 2),
    ("a JSON web token", "eyJ", re.compile(r"eyJ(?<![A-Za-z0-9]eyJ)([A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,})"), 1, 2),
    ("a password in a URL", "://", re.compile(r"://(?<=[a-z0-9+.-]://)[^\s/:@\"'<>]{1,64}:([^\s/:@\"'<>]{6,})@[A-Za-z0-9.-]+"), 1, 2),
    ("a bearer token", "authorization", re.compile(
        r"(?i)authorization[\"']?[ \t]*[:=][ \t]*[\"']?(?:bearer|token)[ \t]+([A-Za-z0-9._~+/=-]{16,})"), 1, 2),
]


def looks_random(value: str, min_classes: int = 2) -> bool:
    """A value that could be a key: not a number, path or placeholder; `min_classes` of digits, lower
    and upper case letters."""
    if value[0] in "/.~" or _MASKED.search(value) or len(set(value)) < 4:
        return False
    try:
        float(value)
        return False
    except ValueError:
        pass
    classes = sum(any(test(c) for c in value) for test in (str.isdigit, str.islower, str.isupper))
    return classes >= min_classes


def _a(name: str) -> str:
    return f"{'an' if name[0] in 'AEIOUaeiou' else 'a'} {name}"


def _assignment(text: str, m: re.Match) -> str | None:
    """'a WANDB_API_KEY' when the value `m` is assigned to a secret's name, else None."""
    before = text[max(m.start() - 96, 0):m.start()].rstrip(" \t\"'")
    word = _NAME_REVERSED.match(before[::-1])
    if not word:
        return None
    name = word.group()[::-1].lstrip("-")
    if not name or _PUBLIC_NAME.search(name):
        return None
    if not (_SECRET_NAME.search(name) or (name.isupper() and _ENV_KEY.search(name))):
        return None
    value = m.group(1)
    if name.lower().endswith("secret_access_key"):  # AWS: 40 characters of base64, '/' and '+' included
        return _a(name.upper()) if len(value) >= 40 and looks_random(value, 1) else None
    if text[m.end(1):m.end(1) + 1] in ("(", "[") or _CODE.match(value) or value.isalpha():  # code: a call,
        return None  # an index, an attribute, a type name (private_key: SSHPrivateKeyTypes)
    if not looks_random(value) or not any(len(p) >= 8 and looks_random(p) for p in _SEGMENTS.split(value)):
        return None  # also words joined by '-' or '.': X-Xet-Access-Token
    name = name if len(name) <= 40 else "..." + name[-37:]
    return _a(name.upper() if name.isupper() or "_" in name else name)


def findings_in(text: str, start: int, stop: int) -> Iterator[tuple[int, str]]:
    """(offset, what) of every credential starting in text[start:stop] (it may run past stop)."""
    for pattern in _ASSIGNED:
        for m in pattern.finditer(text, start):
            if m.start() >= stop:
                break
            if what := _assignment(text, m):
                yield m.start(), what
    lower = None
    for what, needle, pattern, group, classes in TOKEN_SHAPES:
        if needle.islower():
            lower = text.lower() if lower is None else lower
            if needle not in lower:
                continue
        elif needle not in text:
            continue
        for m in pattern.finditer(text, start):
            if m.start() >= stop:
                break
            if group == 0 or looks_random(m.group(group), classes):
                yield m.start(), what


def scan_pieces(pieces: Iterable[str], limit: int = 20) -> list[tuple[int, str]]:
    """(line, what) for each line holding a credential, at most `limit`, in line order. `pieces` is
    the text in order, cut anywhere (a character decoder's output)."""
    found: dict[int, str] = {}
    buf, scanned, lines_before = "", 0, 0  # buf[:scanned] was searched already; lines_before: '\n' before buf
    pieces = iter(pieces)
    while True:
        piece = next(pieces, None)
        final = piece is None
        buf += piece or ""
        stop = len(buf) if final else len(buf) - OVERLAP
        if stop > scanned:
            for offset, what in sorted(findings_in(buf, scanned, stop)):
                line = lines_before + buf.count("\n", 0, offset) + 1
                found.setdefault(line, what)
            if len(found) >= limit:
                break
            keep = max(stop - CONTEXT, 0)
            lines_before += buf.count("\n", 0, keep)
            buf, scanned = buf[keep:], stop - keep
        if final:
            break
    return sorted(found.items())[:limit]
