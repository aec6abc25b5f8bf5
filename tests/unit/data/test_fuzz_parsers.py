"""Structured fuzzing of every table reader through the CLI (docs/design.md §13).

A valid table is mutated the ways real exports break (random bytes, broken quoting, wrong column counts,
bad UTF-8, enormous lines, NUL bytes, CR line ends, duplicate ids, empty or header-only files) and fed to
``pmmrec data prepare``, ``pmmrec data import-atomic`` and ``pmmrec data stats`` (the domain reader). Each
run either imports (and the output reads back as a domain) or exits 2 with one line ``pmmrec: error: ...``
naming the input file, and leaves no output folder and no temporary behind. Any other exception or exit
status fails the test.
"""

import contextlib
import io
import tempfile
from pathlib import Path

from hypothesis import event, given, settings
from hypothesis import strategies as st

from pmmrec.cli import main
from pmmrec.data.domain import read_domain

HUGE = 200_000  # characters: over the csv module's default field limit (131,072)

MUTATIONS = ["bytes", "replace_line", "quote", "drop_field", "extra_field", "bad_utf8", "huge", "nul", "cr",
             "duplicate", "empty", "header_only", "blank_field"]


@st.composite
def mutated(draw, lines: list[bytes], sep: bytes) -> tuple[bytes, str]:
    """``lines`` (header first) with one to three mutations; returns the bytes and the mutation names."""
    lines = list(lines)
    names = draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3))
    for name in names:
        k = draw(st.integers(0, len(lines))) if lines else 0
        at = min(k, len(lines) - 1)
        if name == "bytes":
            lines.insert(k, draw(st.binary(max_size=40)))
        elif name == "replace_line" and lines:
            lines[at] = draw(st.binary(max_size=40))
        elif name == "quote" and lines:
            fields = lines[at].split(sep)
            j = draw(st.integers(0, len(fields) - 1))
            fields[j] = draw(st.sampled_from([b'"', b'"' + fields[j], fields[j] + b'"', b'"a""b', b'"x"y']))
            lines[at] = sep.join(fields)
        elif name == "drop_field" and lines:
            lines[at] = sep.join(lines[at].split(sep)[:-1])
        elif name == "extra_field" and lines:
            lines[at] = lines[at] + sep + draw(st.sampled_from([b"", b"x", b"1", sep]))
        elif name == "bad_utf8" and lines:
            bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf"]))
            j = draw(st.integers(0, len(lines[at])))
            lines[at] = lines[at][:j] + bad + lines[at][j:]
        elif name == "huge" and lines:
            lines[at] = lines[at] + b"h" * HUGE
        elif name == "nul" and lines:
            j = draw(st.integers(0, len(lines[at])))
            lines[at] = lines[at][:j] + b"\x00" + lines[at][j:]
        elif name == "cr" and lines:
            lines[at] = lines[at] + b"\r"
        elif name == "duplicate" and lines:
            lines.insert(k, lines[at])
        elif name == "empty":
            lines = []
        elif name == "header_only":
            lines = lines[:1]
        elif name == "blank_field" and lines:
            fields = lines[at].split(sep)
            fields[draw(st.integers(0, len(fields) - 1))] = b""
            lines[at] = sep.join(fields)
    for name in names:
        event(name)
    return b"\n".join(lines) + (b"\n" if lines and draw(st.booleans()) else b""), "+".join(names)


def _cli(argv: list[str], out: Path | None, inputs: list[Path]) -> str:
    """Run the CLI; check the all-or-nothing contract. Returns "ok" or the error line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)  # any exception other than a PmmrecError escapes here and fails the test
    if out is not None:
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
        assert not leftovers, leftovers
    if code == 0:
        if out is not None:
            read_domain(out, empty_title="blank")
        return "ok"
    lines = [line for line in err.getvalue().splitlines() if line.startswith("pmmrec:")]
    assert code == 2, err.getvalue()
    assert len(lines) == 1 and lines[0].startswith("pmmrec: error: "), err.getvalue()
    assert any(p.name in lines[0] for p in inputs), lines[0]  # the error names the file
    assert out is None or not out.exists()  # never partial output
    return lines[0]


INTERACTIONS = [b"user,item,timestamp", b"u1,1,1", b"u1,2,2", b"u1,3,3", b"u2,2,1", b"u2,3,2", b"u2,1,3"]
ITEMS = [b"item,title", b"1,Apple pie", b'2,"Tea, green"', b"3,Cherry"]


@settings(max_examples=120, deadline=None)
@given(data=st.data(), which=st.sampled_from(["interactions", "items"]))
def test_prepare_imports_or_fails_cleanly(data, which):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log = tmp / "ratings.csv"
        meta = tmp / "movies.csv"
        log.write_bytes(b"\n".join(INTERACTIONS) + b"\n")
        meta.write_bytes(b"\n".join(ITEMS) + b"\n")
        target = log if which == "interactions" else meta
        body, _ = data.draw(mutated(INTERACTIONS if which == "interactions" else ITEMS, b","))
        target.write_bytes(body)
        out = tmp / "out" / "dom"
        out.parent.mkdir()
        result = _cli(["data", "prepare", str(log), str(meta), "--out", str(out), "--min-seq-len", "1"], out,
                      [log, meta])
        event("imported" if result == "ok" else "refused")


INTER = [b"user_id:token\titem_id:token\ttimestamp:float", b"u1\ti1\t1", b"u1\ti2\t2", b"u1\ti3\t3",
         b"u2\ti2\t1", b"u2\ti3\t2", b"u2\ti1\t3"]
ITEM = [b"item_id:token\ttitle:token_seq", b"i1\tApple pie", b"i2\tGreen tea", b"i3\tCherry"]


@settings(max_examples=100, deadline=None)
@given(data=st.data(), which=st.sampled_from(["inter", "item"]))
def test_import_atomic_imports_or_fails_cleanly(data, which):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        src.mkdir()
        (src / "x.inter").write_bytes(b"\n".join(INTER) + b"\n")
        (src / "x.item").write_bytes(b"\n".join(ITEM) + b"\n")
        body, _ = data.draw(mutated(INTER if which == "inter" else ITEM, b"\t"))
        (src / f"x.{which}").write_bytes(body)
        out = tmp / "out" / "dom"
        out.parent.mkdir()
        _cli(["data", "import-atomic", str(src), "--out", str(out), "--min-seq-len", "1"], out,
             [src / "x.inter", src / "x.item", src])


DOMAIN_ITEMS = [b"item_id\ttitle", b"a\tApple", b"b\tBanana", b"c\tCherry"]
DOMAIN_USERS = [b"user_id\titems", b"u1\ta b c", b"u2\tb c", b"u3\tc a"]


@settings(max_examples=120, deadline=None)
@given(data=st.data(), which=st.sampled_from(["items", "users"]))
def test_domain_reader_reads_or_fails_cleanly(data, which):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "dom"
        root.mkdir()
        (root / "items.tsv").write_bytes(b"\n".join(DOMAIN_ITEMS) + b"\n")
        (root / "users.tsv").write_bytes(b"\n".join(DOMAIN_USERS) + b"\n")
        body, _ = data.draw(mutated(DOMAIN_ITEMS if which == "items" else DOMAIN_USERS, b"\t"))
        (root / f"{which}.tsv").write_bytes(body)
        _cli(["data", "stats", str(root)], None, [root / "items.tsv", root / "users.tsv"])
