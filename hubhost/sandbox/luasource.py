"""Source transform that makes Lua's length operator `#` see datastore nodes.

Datastore nodes are proxy tables, and this LuaJIT is built without Lua 5.2 compat, so
`__len` on tables is ignored and `#node` would be 0. Every chunk the sandbox loads is source
text, so before loading we rewrite each unary `#operand` into `__hh_len(operand)`; the
sandbox defines `__hh_len` in every driver environment.

The rewrite is token based, never regex over raw text: strings, long strings, comments and
numbers are skipped exactly as LuaJIT's lexer does. It never adds or removes a newline (error
messages keep their file:line), it returns the source unchanged (the same object) when there
is no `#` outside strings and comments, and it never raises: around anything it does not
understand (syntax errors, unterminated strings) it leaves the text alone so that Lua's
parser reports the problem.

What is rewritten (operand = what `#` applies to):

- a suffixed expression: `Name` or `( expr )`, then any chain of `.Name`, `[expr]`,
  `:Name args`, `(args)`, `{table}`, `"string"`  ->  `__hh_len(operand)`
- a string literal or a table constructor: `#"abc"`, `#{...}`  ->  `__hh_len("abc")`
- varargs: `#...` is the length of the first vararg  ->  `__hh_len((...))`

What is left untouched:

- the first line when it starts with `#` (LuaJIT skips a `#!` header line, after an
  optional UTF-8 BOM);
- `#` whose operand is followed by `^`: `#t^2` means `#(t^2)` in Lua (`^` binds tighter than
  unary operators), which is the length of a number, an error either way;
- `#` whose operand is anything else (`#-t`, `##t`, `#nil`, `#1`, `#function ... end`):
  never a datastore node. Any `#` nested inside (as in `##t` or `#t[#t]`) is still rewritten;
- `#` whose operand is followed by something that would extend a call but not the original
  operand (`#"x":rep(2)`, `#t.`): the source is invalid and must stay invalid;
- `#` where Lua does not expect an expression (after a name, `)`, `end`, `;`, `...`, or at
  the start of the chunk, looking past comments): `x = 1 #t` is a syntax error, and the
  rewrite must not turn it into the valid call statement `x = 1 __hh_len(t)`;
- everything after an unterminated string or long comment (Lua rejects the chunk there).

Speed: one compiled regex jumps from `#` to `#` (strings and comments are skipped inside the
regex engine), common operands (`#t`, `#self.items`, `#t[i]`) are recognised by the same
match, and only other operands are tokenised, as far as they go, with bracket pairs found
by jumping from bracket to bracket and remembered for nested `#`.
"""

from __future__ import annotations

import re

LEN_FUNCTION = "__hh_len"
"""Name of the function the sandbox defines in every driver environment."""

_LONG_BRACKET = r"\[(?P<{0}>=*)\[.*?\](?P={0})\]"
_SHORT_STRING = (
    r'"(?:[^"\\\r\n]++|\\(?:\r\n|\n\r|z[ \t\n\v\f\r]*+|.))*+"'
    r"|'(?:[^'\\\r\n]++|\\(?:\r\n|\n\r|z[ \t\n\v\f\r]*+|.))*+'"
)
# Starts of strings/comments whose end is missing: Lua rejects the chunk, so we stop there.
_UNTERMINATED = r"--\[=*\[|\[=*\[|[\"']"

_NAME = r"[A-Za-z_][A-Za-z0-9_]*+"
# Fast path for the common `#name`, `#a.b`, `#t[i]`, `#t[1]`: plain ASCII, no nested `#`,
# and the next token surely ends the operand (`t\n[1]` is still `t[1]`, so the check looks
# past newlines). Anything else takes the token path.
_SIMPLE = (
    rf"[ \t]*+{_NAME}(?:\.{_NAME}|\[[ \t]*+(?:{_NAME}|[0-9]++)[ \t]*+\])*+"
    r"(?=[ \t\r\n]*+(?:[)\]},;+*/%<>=~]|-(?!-)|\.\.(?!\.)|[A-Za-z_]|\Z))"
)

# Pass 1: jump to the next `#` outside strings and comments. One match consumes everything
# the lexer may hide a `#` in (and all plain code) inside the regex engine, so Python only
# loops once per `#`. Group `sig` keeps the last significant text before the `#` (code,
# string), skipping comments: it tells whether an expression may start there.
_WS = r"[ \t\r\n\f\v]"
_NEXT_HASH = re.compile(
    "(?:"
    + "|".join(
        (
            _WS + "++",
            "--" + _LONG_BRACKET.format("c"),
            r"--(?!\[=*\[)[^\r\n]*+",
            "(?P<sig>"
            + "|".join(
                (
                    r"[^-\"'\[\# \t\r\n\f\v][^-\"'\[\#\r\n]*+",
                    _SHORT_STRING,
                    _LONG_BRACKET.format("s"),
                    r"-(?!-)",
                    r"\[(?!=*\[)",
                )
            )
            + ")",
        )
    )
    + r")*+(?:(?P<hash>\#)(?P<simple>" + _SIMPLE + ")?|(?P<bad>"
    + _UNTERMINATED
    + "))?",
    re.S,
)
# Text an expression may follow: operators, openers, separators and these keywords. After
# anything else (a name, `)`, `end`, `;`, the start of the chunk) a `#` would start a
# statement, which Lua rejects; rewriting it would turn that error into a valid call.
_OPERATOR_END = frozenset("+-*/%^=<>([{,")
_EXPRESSION_KEYWORD = re.compile(
    r"(?<![A-Za-z0-9_\x80-\U0010ffff])(?:return|and|or|not|if|elseif|while|until|in)\Z"
)

# Pass 2, only from a `#` that needs it: single tokens, read forward as far as the operand
# goes, and bracket matching that jumps from bracket to bracket.
_SKIP = re.compile(
    _WS + "*+(?:(?:--" + _LONG_BRACKET.format("c") + r"|--(?!\[=*\[)[^\r\n]*+)" + _WS + "*+)*+",
    re.S,
)
_IDENT = r"A-Za-z0-9_\x80-\U0010ffff"  # LuaJIT treats every byte >= 0x80 as a name byte
_TOKEN = re.compile(
    "|".join(
        (
            rf"(?P<name>[A-Za-z_\x80-\U0010ffff][{_IDENT}]*+)",
            rf"(?P<number>0[xX](?:[pP][+-]|[{_IDENT}.])*+"
            rf"|(?:[0-9]|\.[0-9])(?:[eE][+-]|[{_IDENT}.])*+)",
            "(?P<string>" + _SHORT_STRING + "|" + _LONG_BRACKET.format("s") + ")",
            "(?P<bad>" + _UNTERMINATED + ")",
            r"(?P<op>\.\.\.|\.\.|==|~=|<=|>=|::|.)",
        )
    ),
    re.S,
)
_BRACKET = re.compile(
    "(?:"
    + "|".join(
        (
            r"[^-\"'\[\](){}]++",
            "--" + _LONG_BRACKET.format("c"),
            r"--(?!\[=*\[)[^\r\n]*+",
            _SHORT_STRING,
            _LONG_BRACKET.format("s"),
            r"-(?!-)",
        )
    )
    + ")*+(?:(?P<bad>"
    + _UNTERMINATED
    + r")|(?P<open>[(\[{])|(?P<close>[)\]}]))?",
    re.S,
)
_HEADER = re.compile(r"\ufeff?#[^\r\n]*+")
_KEYWORDS = frozenset(
    "and break do else elseif end false for function if in local nil not or repeat "
    "return then true until while".split()
)
_KEYWORD = re.compile(r"\b(?:" + "|".join(_KEYWORDS) + r")\b")
_CLOSER = {"(": ")", "[": "]", "{": "}"}
_EOF = "<eof>"
# Tokens that would continue a call expression; after an operand they mean "leave it".
_SUFFIX_START = frozenset({".", "[", ":", "(", "{", "string", "^"})


def _token(src: str, pos: int) -> tuple[str, int, int]:
    """(kind, start, end) of the token at or after pos. Kinds: 'name', 'number', 'string',
    a keyword, the operator text, or '<eof>' (also for a lexing error)."""
    start = _SKIP.match(src, pos).end()
    m = _TOKEN.match(src, start)
    if m is None or m.lastgroup == "bad":
        return _EOF, start, start
    group = m.lastgroup or _EOF  # always set: one alternative matched
    if group == "name":
        text = m.group()
        return (text if text in _KEYWORDS else "name"), start, m.end()
    if group == "op":
        return m.group(), start, m.end()
    return group, start, m.end()  # 'number' or 'string'


def _closing(src: str, opener: int, matches: dict[int, int | None]) -> int | None:
    """Offset just after the bracket that closes the one at `opener`; None if unbalanced.

    Every bracket pair met on the way is remembered in `matches`, so nested operands
    (`#t[#u[#v]]`) never scan the same text twice."""
    if opener in matches:
        return matches[opener]
    stack = [opener]
    pos = opener + 1
    while stack:
        m = _BRACKET.match(src, pos)
        group = m.lastgroup
        if group == "open":
            stack.append(m.start("open"))
        elif group == "close" and _CLOSER[src[stack[-1]]] == m.group("close"):
            matches[stack.pop()] = m.end()
        else:  # end of source, a mismatched bracket or an unterminated string/comment
            for unmatched in stack:
                matches[unmatched] = None
            return None
        pos = m.end()
    return matches[opener]


def _args_end(src: str, pos: int, matches: dict[int, int | None]) -> int | None:
    """End offset of call arguments at pos: (…), {…} or a string; None if there are none."""
    kind, start, end = _token(src, pos)
    if kind == "(" or kind == "{":
        return _closing(src, start, matches)
    if kind == "string":
        return end
    return None


def _operand(src: str, hash_pos: int, matches: dict[int, int | None]) -> tuple[int, bool] | None:
    """End offset of the operand of the `#` at hash_pos and whether it is `...`; None to
    leave this `#` alone."""
    kind, start, end = _token(src, hash_pos + 1)
    last: int | None
    if kind == "string" or kind == "...":
        last = end
    elif kind == "{":
        last = _closing(src, start, matches)
    elif kind == "name" or kind == "(":
        last = end if kind == "name" else _closing(src, start, matches)
        while last is not None:  # the suffix chain
            nxt, nstart, nend = _token(src, last)
            if nxt == ".":
                name, _, name_end = _token(src, nend)
                if name != "name":
                    break
                last = name_end
            elif nxt == "[":
                last = _closing(src, nstart, matches)
            elif nxt == ":":
                name, _, name_end = _token(src, nend)
                args = _args_end(src, name_end, matches) if name == "name" else None
                if args is None:
                    break  # incomplete method call: ':' follows, so we give up below
                last = args
            elif nxt == "(" or nxt == "{" or nxt == "string":
                last = _args_end(src, nstart, matches)
            else:
                break
    else:
        return None
    if last is None or _token(src, last)[0] in _SUFFIX_START:
        return None
    return last, kind == "..."


_ASCII_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


def _is_ident_char(ch: str) -> bool:
    """True if ch would merge with a following name (LuaJIT: bytes >= 0x80 are name bytes)."""
    return ch in _ASCII_NAME_CHARS or ch > "\x7f"


def _expression_may_follow(source: str, end: int) -> bool:
    """True if the significant text ending at `end` leaves room for an expression."""
    while source[end - 1] in " \t\f\v":  # code runs may end in spaces, never start so
        end -= 1
    last = source[end - 1]
    if last in _OPERATOR_END:
        return True
    if last == ".":  # `..` concatenates; `...` is a value; a lone `.` is an error
        return source.endswith("..", 0, end) and not source.endswith("...", 0, end)
    if last in _ASCII_NAME_CHARS:
        return _EXPRESSION_KEYWORD.search(source, max(0, end - 7), end) is not None
    return False


def rewrite_len(source: str) -> str:
    """Rewrite every unary `#operand` in Lua source into `__hh_len(operand)`.

    Keeps every newline where it was and returns `source` itself when nothing changes.
    """
    if "#" not in source:
        return source
    start = 0
    header = _HEADER.match(source)
    if header is not None:
        start = header.end()
    edits: list[tuple[int, int, str]] = []  # (offset, 0 insert / 1 replace '#', text)
    matches: dict[int, int | None] = {}  # bracket offset -> offset after its closer
    pos = start
    expression = False  # may an expression start here? Not at the start of the chunk.
    while True:
        m = _NEXT_HASH.match(source, pos)
        group = m.lastgroup
        if group != "hash" and group != "simple":
            break  # end of source, or an unterminated string/comment: Lua will complain
        if m.start("sig") >= 0:
            expression = _expression_may_follow(source, m.end("sig"))
        hash_pos = m.start("hash")
        if not expression:  # `#` in statement position: a syntax error we must keep
            pos = hash_pos + 1
            expression = True
            continue
        if group == "simple" and _KEYWORD.search(m.group("simple")) is None:
            pos = end = m.end()
            vararg = False
            expression = False  # the operand ended with a name or `]`
        else:
            pos = hash_pos + 1  # rescan the operand: it may hold nested `#`
            expression = True
            found = _operand(source, hash_pos, matches)
            if found is None:
                continue
            end, vararg = found
        opener = LEN_FUNCTION + ("((" if vararg else "(")
        if hash_pos > 0 and _is_ident_char(source[hash_pos - 1]):
            opener = " " + opener  # `and#t` must not become the name `and__hh_len`
        edits.append((hash_pos, 1, opener))
        edits.append((end, 0, "))" if vararg else ")"))
    if not edits:
        return source
    edits.sort()
    out: list[str] = []
    last = 0
    for offset, replace, text in edits:
        out.append(source[last:offset])
        out.append(text)
        last = offset + replace
    out.append(source[last:])
    return "".join(out)
