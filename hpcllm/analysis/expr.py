"""The `--where` language of `hpcllm filter`: parsed into a small AST, evaluated on numpy blocks.

Grammar (keywords case-insensitive; never Python ``eval``)::

    expr    := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | "(" expr ")" | compare
    compare := operand OP operand | operand ["not"] "in" "(" operand ("," operand)* ")"
             | NAME                                  (a column alone: true where non-zero, e.g. ``keep``)
    operand := NUMBER | STRING | NAME | "-" NUMBER | "q" "(" NUMBER ")" | "q" "(" NAME "," NUMBER ")"
    OP      := == | != | < | <= | > | >=

A NAME is a column (``perplexity``, ``score.n_tokens``) or, compared with an
enum column, one of its value names (``status == ok``, ``finish_reason in
(stop, length)``).  ``q(p)`` is the quantile p of the column on the other side
over the rows with status ok (``q(col, p)`` names the column); NaN compares
false, as in numpy.  Errors are one line that points at the offending token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from hpcllm.errors import HpcllmError

_TOKEN = re.compile(r"\s*(?:(?P<num>\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)|(?P<str>'[^']*'|\"[^\"]*\")"
                    r"|(?P<name>[A-Za-z_][A-Za-z0-9_.]*)|(?P<op>==|!=|<=|>=|<|>)|(?P<punct>[(),-]))")
KEYWORDS = {"and", "or", "not", "in"}
OPS = {"==": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal, ">": np.greater,
       ">=": np.greater_equal}


@dataclass
class Tok:
    kind: str      # num str name op punct kw end
    text: str
    pos: int


@dataclass
class Node:
    kind: str      # or and not cmp in col num str sym q
    pos: int
    args: tuple = ()
    value: object = None


def tokenize(text: str) -> list[Tok]:
    out, i = [], 0
    while i < len(text):
        if text[i:].strip() == "":
            break
        m = _TOKEN.match(text, i)
        if not m:
            j = len(text) - len(text[i:].lstrip())
            raise WhereError(text, j, f"unexpected character {text[j]!r}")
        kind = m.lastgroup
        val = m.group(kind)
        pos = m.start(kind)
        if kind == "name" and val.lower() in KEYWORDS:
            kind, val = "kw", val.lower()
        out.append(Tok(kind, val, pos))
        i = m.end()
    out.append(Tok("end", "", len(text)))
    return out


class WhereError(HpcllmError):
    def __init__(self, text: str, pos: int, msg: str):
        super().__init__(f"--where {text!r}: {msg} at character {pos + 1} ({text[pos:pos + 20]!r})"
                         if pos < len(text) else f"--where {text!r}: {msg} at the end")


class Parser:
    def __init__(self, text: str):
        self.text, self.toks, self.i = text, tokenize(text), 0

    def peek(self) -> Tok:
        return self.toks[self.i]

    def take(self, kind: str, text: str | None = None) -> Tok:
        t = self.peek()
        if t.kind != kind or (text is not None and t.text != text):
            want = repr(text) if text else kind
            raise WhereError(self.text, t.pos, f"expected {want}, found {t.text!r}" if t.text else f"expected {want}")
        self.i += 1
        return t

    def at(self, kind: str, text: str | None = None) -> bool:
        t = self.peek()
        return t.kind == kind and (text is None or t.text == text)

    def parse(self) -> Node:
        if self.at("end"):
            raise WhereError(self.text, 0, "empty expression")
        node = self.expr()
        if not self.at("end"):
            raise WhereError(self.text, self.peek().pos, f"unexpected {self.peek().text!r}")
        return node

    def expr(self) -> Node:
        return self._chain("or", self.conj)

    def conj(self) -> Node:
        return self._chain("and", self.neg)

    def _chain(self, keyword: str, operand) -> Node:
        """``operand (keyword operand)*`` as one n-ary node (or the single operand)."""
        items = [operand()]
        while self.at("kw", keyword):
            self.i += 1
            items.append(operand())
        return items[0] if len(items) == 1 else Node(keyword, items[0].pos, tuple(items))

    def neg(self) -> Node:
        t = self.peek()
        if self.at("kw", "not"):
            self.i += 1
            return Node("not", t.pos, (self.neg(),))
        if self.at("punct", "("):
            self.i += 1
            node = self.expr()
            self.take("punct", ")")
            return node
        return self.compare()

    def compare(self) -> Node:
        left = self.operand()
        t = self.peek()
        if t.kind == "op":
            self.i += 1
            return Node("cmp", t.pos, (left, self.operand()), t.text)
        negate = self.at("kw", "not")
        if negate:
            self.i += 1
        if self.at("kw", "in"):
            self.i += 1
            self.take("punct", "(")
            values = [self.operand()]
            while self.at("punct", ","):
                self.i += 1
                values.append(self.operand())
            self.take("punct", ")")
            node = Node("in", t.pos, (left, *values))
            return Node("not", t.pos, (node,)) if negate else node
        if left.kind == "sym" and not negate:     # a bool column alone (dedup's keep)
            return Node("truth", left.pos, (left,))
        raise WhereError(self.text, t.pos, "expected a comparison (== != < <= > >= in)"
                         + (f", found {t.text!r}" if t.text else ""))

    def operand(self) -> Node:
        t = self.peek()
        if t.kind == "punct" and t.text == "-":
            self.i += 1
            n = self.take("num")
            return Node("num", t.pos, value=-float(n.text))
        if t.kind == "num":
            self.i += 1
            return Node("num", t.pos, value=float(t.text))
        if t.kind == "str":
            self.i += 1
            return Node("str", t.pos, value=t.text[1:-1])
        if t.kind == "name":
            self.i += 1
            if t.text == "q" and self.at("punct", "("):
                return self.quantile(t)
            return Node("sym", t.pos, value=t.text)
        raise WhereError(self.text, t.pos, f"expected a column, number or name, found {t.text!r}"
                         if t.text else "expected a column, number or name")

    def quantile(self, t: Tok) -> Node:
        self.take("punct", "(")
        col = None
        if self.at("name"):
            col = Node("col", self.peek().pos, value=self.take("name").text)
            self.take("punct", ",")
        p = self.take("num")
        self.take("punct", ")")
        if not 0.0 <= float(p.text) <= 1.0:
            raise WhereError(self.text, p.pos, f"q({p.text}): the quantile must be between 0 and 1")
        return Node("q", t.pos, (col,) if col else (), float(p.text))


def parse(text: str) -> Node:
    return Parser(text).parse()


class Bound:
    """An expression bound to the columns of a Results: the columns and quantiles it needs."""

    def __init__(self, text: str, res):
        self.text, self.res = text, res
        self.columns: list[str] = []
        self.quantiles: dict[str, set] = {}
        self.root = self._bind(parse(text))

    def _err(self, pos: int, msg: str):
        return WhereError(self.text, pos, msg)

    def _column(self, node: Node) -> Node:
        if node.value not in self.res.columns:
            raise self._err(node.pos, f"unknown column {node.value!r} (columns: {', '.join(self.res.names)})")
        info = self.res.info(node.value)
        if info.kind not in ("numeric", "enum", "string"):
            raise self._err(node.pos, f"column {node.value!r} is a {info.kind} column; --where compares "
                                      "one value per document")
        if node.value not in self.columns:
            self.columns.append(node.value)
        return Node("col", node.pos, value=node.value)

    def _bind(self, node: Node) -> Node:
        if node.kind in ("or", "and", "not"):
            return Node(node.kind, node.pos, tuple(self._bind(a) for a in node.args))
        if node.kind == "truth":
            col = self._column(node.args[0])
            if self.res.info(col.value).dtype != np.bool_:
                raise self._err(node.pos, f"column {col.value!r} alone is a condition only if it is bool; "
                                          "compare it (== != < <= > >= in)")
            return Node("cmp", node.pos, (col, Node("num", node.pos, value=0.0)), "!=")
        ops = list(node.args)
        cols = [a for a in ops if a.kind == "sym" and a.value in self.res.columns]
        if not cols and not any(a.kind == "q" and a.args for a in ops):
            sym = next((a for a in ops if a.kind == "sym"), ops[0])
            raise self._err(sym.pos, f"unknown column {sym.value!r} (columns: {', '.join(self.res.names)})"
                            if sym.kind == "sym" else "a comparison needs a column")
        col = self._column(cols[0]) if cols else None
        bound = [self._operand(a, col) for a in ops]
        return Node(node.kind, node.pos, tuple(bound), node.value)

    def _operand(self, a: Node, col: Node | None) -> Node:
        if a.kind == "sym" and a.value in self.res.columns:
            return self._column(a)
        if a.kind == "sym":
            info = self.res.info(col.value) if col is not None else None
            names = [n.lower() if n else None for n in (info.names or [])] if info is not None else []
            if a.value.lower() not in names:
                hint = f" (values of {col.value}: {', '.join(n for n in names if n)})" if names else \
                    f" (columns: {', '.join(self.res.names)})"
                raise self._err(a.pos, f"unknown {'value' if names else 'column'} {a.value!r}{hint}")
            return Node("num", a.pos, value=float(names.index(a.value.lower())))
        if a.kind == "q":
            target = self._column(a.args[0]) if a.args else col
            if target is None or self.res.info(target.value).kind != "numeric":
                raise self._err(a.pos, "q(p) needs a numeric column to compare with (or q(column, p))")
            self.quantiles.setdefault(target.value, set()).add(a.value)
            return Node("q", a.pos, value=(target.value, a.value))
        return a

    def evaluate(self, block: dict, qv) -> np.ndarray:
        """Boolean mask of a block; ``qv(column, p, block)`` gives a quantile (scalar or per row)."""
        return _eval(self.root, block, qv)


def _value(node: Node, block, qv):
    if node.kind == "col":
        return block[node.value]
    if node.kind == "q":
        return qv(*node.value, block)
    return node.value


def _eval(node: Node, block, qv) -> np.ndarray:
    if node.kind == "or":
        return np.logical_or.reduce([_eval(a, block, qv) for a in node.args])
    if node.kind == "and":
        return np.logical_and.reduce([_eval(a, block, qv) for a in node.args])
    if node.kind == "not":
        return ~_eval(node.args[0], block, qv)
    vals = [_value(a, block, qv) for a in node.args]
    if node.kind == "in":
        return np.logical_or.reduce([np.asarray(vals[0] == v) for v in vals[1:]])
    a, b = vals
    if isinstance(a, str) or isinstance(b, str) or getattr(a, "dtype", None) == object \
            or getattr(b, "dtype", None) == object:
        if node.value not in ("==", "!="):
            raise WhereError("", 0, f"strings compare only with == and != (at {node.pos + 1})")
        return np.asarray(OPS[node.value](np.asarray(a, dtype=object), np.asarray(b, dtype=object)), bool)
    return OPS[node.value](np.asarray(a, np.float64), np.asarray(b, np.float64))
