"""Numerical mutation operators of ``parity mutate``: the small source changes a port plausibly gets wrong.

Each operator looks at one node of a module's AST and proposes edits: a span of the source
replaced by new text, everything else (comments, formatting, line numbers) untouched. A mutant
is one edit applied to one file. Operators work on the forms MLX ports write (``mx.``, ``nn.``,
``np.`` under whatever names the module imports them as) and skip what cannot matter
numerically: docstrings, annotations, decorators, ``raise`` / ``assert`` statements, f-strings
and the tests of ``if ...: raise`` guards. Every mutant is checked to parse.

``OPERATORS`` lists them (name -> one line saying what the mutant does); :func:`mutants` applies
them to a file.
"""
from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

#: Nodes whose source text can stand anywhere an expression can, without parentheses.
ATOMIC = (ast.Name, ast.Attribute, ast.Call, ast.Subscript, ast.List, ast.Dict, ast.Set, ast.ListComp,
          ast.DictComp, ast.SetComp)
#: Expressions that are never one array (a cast of them is a type error, not a numerical change).
NOT_ARRAYS = (ast.Tuple, ast.List, ast.Dict, ast.Set, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp,
              ast.Constant, ast.JoinedStr, ast.Lambda, ast.Compare, ast.BoolOp)
CONCATS = ("concatenate", "concat", "stack", "hstack", "vstack")
PERMUTES = ("transpose", "permute")
AXIS_KEYWORDS = ("axis", "dim")


@dataclass(frozen=True)
class Edit:
    """Replace the source from ``start`` to ``end`` (``(line, column)``, 1-based lines, UTF-8 byte columns) by ``text``."""

    start: tuple[int, int]
    end: tuple[int, int]
    text: str


@dataclass(frozen=True)
class Mutant:
    """One edit of one file by one operator."""

    id: str
    operator: str
    file: str
    line: int
    end_line: int
    function: str
    original: str
    replacement: str
    source: str
    diff: str

    def summary(self) -> str:
        """``file:line (function) original -> replacement`` on one line."""
        one = lambda text: " ".join(text.split())  # noqa: E731
        where = f"{Path(self.file).name}:{self.line}" + (f" ({self.function})" if self.function else "")
        return f"{where}: {one(self.original)} -> {one(self.replacement)}"


class Source:
    """A module's text, AST (with parent links) and the names it imports MLX and NumPy under."""

    def __init__(self, text: str, path: str = "<source>"):
        self.text, self.path = text, path
        self.tree = ast.parse(text, path)
        self.lines = text.splitlines(keepends=True)
        self._starts = [0]
        for line in self.lines:
            self._starts.append(self._starts[-1] + len(line))
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                child.parent = node  # type: ignore[attr-defined]
        self.mx, self.nn, self.np, self.math = set(), set(), set(), set()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    name = alias.asname or alias.name
                    {"mlx.core": self.mx, "mlx.nn": self.nn, "numpy": self.np, "math": self.math}.get(
                        alias.name, set()).add(name)
            elif isinstance(node, ast.ImportFrom) and node.module == "mlx":
                for alias in node.names:
                    {"core": self.mx, "nn": self.nn}.get(alias.name, set()).add(alias.asname or alias.name)

    @property
    def mlx(self) -> str | None:
        """The name ``mlx.core`` is imported under (``mx``), or None."""
        return min(self.mx) if self.mx else None

    def segment(self, node: ast.AST) -> str:
        """The node's source text (``ast.get_source_segment`` without re-splitting the file each time)."""
        return self.text[self.offset(node.lineno, node.col_offset):self.offset(node.end_lineno, node.end_col_offset)]

    def wrap(self, node: ast.AST) -> str:
        """The node's source, parenthesised unless it is atomic."""
        text = self.segment(node)
        return text if isinstance(node, ATOMIC) and "\n" not in text else f"({text})"

    def offset(self, line: int, col: int) -> int:
        """Character offset in ``text`` of a 1-based line and a UTF-8 byte column."""
        if line > len(self.lines):
            return len(self.text)
        return self._starts[line - 1] + len(self.lines[line - 1].encode()[:col].decode())

    def apply(self, edit: Edit) -> str:
        """The source with ``edit`` applied; a multi-line span keeps its line count (the text is padded in parentheses)."""
        start, end = self.offset(*edit.start), self.offset(*edit.end)
        text = edit.text
        missing = self.text[start:end].count("\n") - text.count("\n")
        if missing > 0:
            text = f"({text}{chr(10) * missing})"
        return self.text[:start] + text + self.text[end:]

    # --- node predicates ------------------------------------------------------------------------
    def is_module_attr(self, node: ast.AST, modules: set[str], names: tuple[str, ...] | str) -> bool:
        """``node`` is ``<one of modules>.<one of names>`` (``mx.float32``)."""
        names = (names,) if isinstance(names, str) else names
        return (isinstance(node, ast.Attribute) and node.attr in names and isinstance(node.value, ast.Name)
                and node.value.id in modules)

    def mentions_mlx(self, node: ast.AST) -> bool:
        """Some ``mx.`` / ``nn.`` attribute occurs inside ``node`` (its value is likely an MLX array)."""
        modules = self.mx | self.nn
        return any(isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in modules
                   for n in ast.walk(node))


def edit(node: ast.AST, text: str) -> Edit:
    return Edit((node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset), text)


def swap(src: Source, a: ast.AST, b: ast.AST) -> Edit:
    """Exchange the source texts of two sibling nodes (``a`` before ``b``), keeping what lies between them."""
    between = src.text[src.offset(a.end_lineno, a.end_col_offset):src.offset(b.lineno, b.col_offset)]
    return Edit((a.lineno, a.col_offset), (b.end_lineno, b.end_col_offset),
                src.segment(b) + between + src.segment(a))


def _int(node: ast.AST) -> int | None:
    """The value of an int literal (``3``, ``-1``), else None."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and _int(node.operand) is not None:
        return -_int(node.operand)
    return None


def _number(node: ast.AST) -> float | int | None:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and _number(node.operand) is not None:
        return -_number(node.operand)
    return None


def _float_text(value: float) -> str:
    return repr(float(f"{value:.6g}"))


def _method(node: ast.AST, names: tuple[str, ...] | str) -> bool:
    """``node`` is a call of a method or module function named one of ``names`` (``x.astype(...)``, ``mx.stack(...)``)."""
    names = (names,) if isinstance(names, str) else names
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names


def _differing_pair(items: list[ast.AST], src: Source, last: bool = True) -> tuple[ast.AST, ast.AST] | None:
    """Two adjacent elements with different source texts (the last such pair, or the first), none starred."""
    pairs = list(zip(items, items[1:]))
    for a, b in (reversed(pairs) if last else pairs):
        if not isinstance(a, ast.Starred) and not isinstance(b, ast.Starred) and src.segment(a) != src.segment(b):
            return a, b
    return None


def _shape_items(node: ast.Call, src: Source) -> list[ast.AST]:
    """The dimensions a ``reshape`` / ``transpose`` call lists: its arguments (after the array, for ``mx.reshape``),
    or the one tuple/list it is given."""
    module = isinstance(node.func.value, ast.Name) and node.func.value.id in src.mx | src.np
    args = node.args[1:] if module else node.args
    if len(args) == 1 and isinstance(args[0], (ast.Tuple, ast.List)):
        return list(args[0].elts)
    return list(args)


# --- operators: precision ------------------------------------------------------------------------

def drop_upcast(node: ast.AST, src: Source) -> Iterator[Edit]:
    if _method(node, "astype") and len(node.args) == 1 and \
            src.is_module_attr(node.args[0], src.mx | src.np, "float32"):
        yield edit(node, src.wrap(node.func.value))


def drop_cast_back(node: ast.AST, src: Source) -> Iterator[Edit]:
    if _method(node, "astype") and len(node.args) == 1 and not src.is_module_attr(node.args[0], src.mx | src.np, (
            "float32", "float64", "bfloat16", "float16", "int32", "int64", "uint8", "bool_")):
        yield edit(node, src.wrap(node.func.value))


def upcast_to_bf16(node: ast.AST, src: Source) -> Iterator[Edit]:
    if not src.is_module_attr(node, src.mx, "float32"):
        return
    parent = getattr(node, "parent", None)
    if (_method(parent, "astype") and node in parent.args) or (isinstance(parent, ast.keyword) and parent.arg == "dtype"):
        yield edit(node, f"{node.value.id}.bfloat16")


def _cast(dtype: str) -> Callable[[ast.AST, Source], Iterator[Edit]]:
    def cast(node: ast.AST, src: Source) -> Iterator[Edit]:
        if not src.mlx or not _in_function(node):
            return
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
        elif isinstance(node, ast.Return) and node.value is not None:
            value = node.value
        else:
            return
        if isinstance(value, NOT_ARRAYS) or _method(value, "astype") or not src.mentions_mlx(value):
            return
        text = src.segment(value)
        wrapped = text if isinstance(value, ATOMIC) else f"({text})"
        yield edit(value, f"{wrapped}.astype({src.mlx}.{dtype})")
    return cast


def float64_to_float32(node: ast.AST, src: Source) -> Iterator[Edit]:
    if src.is_module_attr(node, src.np | src.mx, "float64"):
        yield edit(node, f"{node.value.id}.float32")


def softmax_imprecise(node: ast.AST, src: Source) -> Iterator[Edit]:
    if isinstance(node, ast.keyword) and node.arg == "precise" and isinstance(node.value, ast.Constant) \
            and node.value.value is True:
        yield edit(node.value, "False")


# --- operators: constants --------------------------------------------------------------------------

def eps_x10(node: ast.AST, src: Source) -> Iterator[Edit]:
    if isinstance(node, ast.Constant) and type(node.value) is float and 0 < abs(node.value) <= 1e-3:
        yield edit(node, _float_text(node.value * 10))


def constant_x2(node: ast.AST, src: Source) -> Iterator[Edit]:
    if not isinstance(node, ast.Constant) or type(node.value) not in (int, float) or node.value == 0:
        return
    if type(node.value) is float and abs(node.value) > 1e-3:
        yield edit(node, _float_text(node.value * 2))
    elif type(node.value) is int and isinstance(getattr(node, "parent", None), ast.BinOp) \
            and isinstance(node.parent.op, (ast.Mult, ast.Div, ast.FloorDiv)):
        yield edit(node, str(node.value * 2))


def power_halved(node: ast.AST, src: Source) -> Iterator[Edit]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        value = _number(node.right)
        if value:
            yield edit(node.right, f"({_float_text(value / 2)})" if value < 0 else _float_text(value / 2))


def sqrt_dropped(node: ast.AST, src: Source) -> Iterator[Edit]:
    if isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords and \
            src.is_module_attr(node.func, src.mx | src.np | src.math, ("sqrt", "rsqrt")):
        yield edit(node, src.wrap(node.args[0]))


# --- operators: axes, layouts, indices -------------------------------------------------------------

def permute_swap(node: ast.AST, src: Source) -> Iterator[Edit]:
    if _method(node, PERMUTES):
        pair = _differing_pair(_shape_items(node, src), src)
        if pair:
            yield swap(src, *pair)
    elif _method(node, "swapaxes") and len(node.args) >= 2 and _int(node.args[-1]) is not None:
        axis, other = _int(node.args[-1]), _int(node.args[-2])
        moved = next(a for a in (axis - 1, axis + 1, axis + 2) if a != other and (a >= 0) == (axis >= 0))
        yield edit(node.args[-1], str(moved))


def reshape_swap(node: ast.AST, src: Source) -> Iterator[Edit]:
    if _method(node, "reshape"):
        pair = _differing_pair(_shape_items(node, src), src)
        if pair:
            yield swap(src, *pair)


def concat_swap(node: ast.AST, src: Source) -> Iterator[Edit]:
    if _method(node, CONCATS) and node.args and isinstance(node.args[0], (ast.List, ast.Tuple)):
        pair = _differing_pair(list(node.args[0].elts), src, last=False)
        if pair:
            yield swap(src, *pair)


def axis_shift(node: ast.AST, src: Source) -> Iterator[Edit]:
    if isinstance(node, ast.keyword) and node.arg in AXIS_KEYWORDS and _int(node.value) is not None:
        axis = _int(node.value)
        yield edit(node.value, str(1 if axis == 0 else axis - 1))


def _moved(bound: ast.AST, src: Source, start: bool) -> str:
    """A slice bound moved by one element: a negative literal away from the end, anything else + 1."""
    value = _int(bound)
    if value is not None:
        return str(value - 1 if value < 0 else value + 1)
    return f"{src.wrap(bound)} + 1"


def slice_off_by_one(node: ast.AST, src: Source) -> Iterator[Edit]:
    if isinstance(node, ast.Slice):
        for bound, start in ((node.lower, True), (node.upper, False)):
            if bound is not None:
                yield edit(bound, _moved(bound, src, start))


def index_off_by_one(node: ast.AST, src: Source) -> Iterator[Edit]:
    if isinstance(node, ast.Subscript):
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        for item in items:
            value = _int(item)
            if value is not None:
                yield edit(item, str(value - 1 if value < 0 else value + 1))


def pad_swap(node: ast.AST, src: Source) -> Iterator[Edit]:
    if _method(node, "pad") and len(node.args) >= 2 and isinstance(node.args[1], (ast.List, ast.Tuple)):
        for pair in node.args[1].elts:
            if isinstance(pair, (ast.Tuple, ast.List)) and len(pair.elts) == 2 and \
                    src.segment(pair.elts[0]) != src.segment(pair.elts[1]):
                yield swap(src, *pair.elts)


def int_off_by_one(node: ast.AST, src: Source) -> Iterator[Edit]:
    parent = getattr(node, "parent", None)
    if isinstance(node, ast.Constant) and type(node.value) is int and isinstance(parent, ast.BinOp) \
            and isinstance(parent.op, (ast.Add, ast.Sub)):
        yield edit(node, str(node.value + 1))


def trunc_round(node: ast.AST, src: Source) -> Iterator[Edit]:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "int" and len(node.args) == 1:
        yield edit(node.func, "round")


# --- operators: arithmetic -------------------------------------------------------------------------

def _operands(node: ast.AST, op: type) -> bool:
    return isinstance(node, ast.BinOp) and isinstance(node.op, op) and \
        not isinstance(node.left, (ast.Constant, ast.JoinedStr)) and not isinstance(node.right, (ast.Constant, ast.JoinedStr))


def drop_operand(node: ast.AST, src: Source) -> Iterator[Edit]:
    if _operands(node, ast.Add):
        yield edit(node, src.wrap(node.left))


def drop_factor(node: ast.AST, src: Source) -> Iterator[Edit]:
    if _operands(node, ast.Mult):
        yield edit(node, src.wrap(node.left))


def sub_swap(node: ast.AST, src: Source) -> Iterator[Edit]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub):
        yield edit(node, f"{src.wrap(node.right)} - {src.wrap(node.left)}")


def sign_dropped(node: ast.AST, src: Source) -> Iterator[Edit]:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and not isinstance(node.operand, ast.Constant):
        yield edit(node, src.wrap(node.operand))


_FLIPPED = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt}


def compare_boundary(node: ast.AST, src: Source) -> Iterator[Edit]:
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _FLIPPED:
        flipped = ast.Compare(node.left, [_FLIPPED[type(node.ops[0])]()], node.comparators)
        yield edit(node, ast.unparse(flipped))


def min_max_swap(node: ast.AST, src: Source) -> Iterator[Edit]:
    if isinstance(node, ast.Name) and node.id in ("min", "max") and isinstance(getattr(node, "parent", None), ast.Call) \
            and node.parent.func is node:
        yield edit(node, "max" if node.id == "min" else "min")
    elif src.is_module_attr(node, src.mx | src.np, ("minimum", "maximum")):
        yield edit(node, f"{node.value.id}.{'maximum' if node.attr == 'minimum' else 'minimum'}")


# --- operators: functions --------------------------------------------------------------------------

def gelu_swap(node: ast.AST, src: Source) -> Iterator[Edit]:
    swapped = {"gelu": "gelu_approx", "gelu_approx": "gelu", "gelu_fast_approx": "gelu"}
    if src.is_module_attr(node, src.nn, tuple(swapped)):
        yield edit(node, f"{node.value.id}.{swapped[node.attr]}")
    elif isinstance(node, ast.keyword) and node.arg == "approx" and isinstance(node.value, ast.Constant):
        other = {"none": "tanh", "precise": "tanh", "tanh": "none", "fast": "none"}.get(node.value.value)
        if other:
            yield edit(node.value, repr(other))


def silu_gelu_swap(node: ast.AST, src: Source) -> Iterator[Edit]:
    swapped = {"silu": "gelu", "SiLU": "GELU", "gelu": "silu", "gelu_approx": "silu", "GELU": "SiLU"}
    if src.is_module_attr(node, src.nn, tuple(swapped)):
        yield edit(node, f"{node.value.id}.{swapped[node.attr]}")


def sin_cos_swap(node: ast.AST, src: Source) -> Iterator[Edit]:
    if src.is_module_attr(node, src.mx | src.np | src.math, ("sin", "cos")):
        yield edit(node, f"{node.value.id}.{'cos' if node.attr == 'sin' else 'sin'}")


#: name -> (what the mutant does, the operator).
OPERATORS: dict[str, tuple[str, Callable[[ast.AST, Source], Iterator[Edit]]]] = {
    "drop_upcast": ("a float32 upcast removed (x.astype(mx.float32) -> x): the op runs in the input's dtype", drop_upcast),
    "upcast_to_bf16": ("a float32 dtype (astype or dtype=) made bfloat16: that intermediate is computed in bf16",
                       upcast_to_bf16),
    "cast_bf16": ("an intermediate rounded to bfloat16 (v = e -> v = e.astype(mx.bfloat16))", _cast("bfloat16")),
    "cast_fp16": ("an intermediate rounded to float16 (v = e -> v = e.astype(mx.float16))", _cast("float16")),
    "drop_cast_back": ("a cast back to a run dtype removed (x.astype(x.dtype) -> x): the value stays wider",
                       drop_cast_back),
    "float64_to_float32": ("a float64 (host-side) computation done in float32", float64_to_float32),
    "softmax_imprecise": ("softmax(..., precise=True) -> precise=False", softmax_imprecise),
    "eps_x10": ("an epsilon-sized constant times 10 (1e-6 -> 1e-5)", eps_x10),
    "constant_x2": ("a scale constant doubled", constant_x2),
    "power_halved": ("a power's exponent halved (x ** -0.5 -> x ** -0.25: a scale becomes its square root)",
                     power_halved),
    "sqrt_dropped": ("a square root (or rsqrt) dropped", sqrt_dropped),
    "permute_swap": ("two axes of a transpose swapped (or swapaxes on the wrong axis)", permute_swap),
    "reshape_swap": ("two dimensions of a reshape swapped", reshape_swap),
    "concat_swap": ("two operands of a concatenate / stack in the other order", concat_swap),
    "axis_shift": ("axis= / dim= one off (a reduction, softmax, concat or split over the wrong axis)", axis_shift),
    "slice_off_by_one": ("a slice bound moved by one element", slice_off_by_one),
    "index_off_by_one": ("an integer index moved by one", index_off_by_one),
    "pad_swap": ("a padding applied on the other side (before <-> after)", pad_swap),
    "int_off_by_one": ("an integer in a sum or difference off by one (n + 1 -> n + 2)", int_off_by_one),
    "trunc_round": ("int(x) (truncation) -> round(x)", trunc_round),
    "drop_operand": ("an operand dropped from a sum (a + b -> a: a residual or shift lost)", drop_operand),
    "drop_factor": ("a factor dropped from a product (a * b -> a: a gate or scale lost)", drop_factor),
    "sub_swap": ("a difference reversed (a - b -> b - a)", sub_swap),
    "sign_dropped": ("a negation dropped (-x -> x)", sign_dropped),
    "compare_boundary": ("a comparison's boundary moved (< <-> <=, > <-> >=)", compare_boundary),
    "min_max_swap": ("min <-> max", min_max_swap),
    "gelu_swap": ("GELU exact <-> tanh approximation", gelu_swap),
    "silu_gelu_swap": ("SiLU <-> GELU", silu_gelu_swap),
    "sin_cos_swap": ("sin <-> cos", sin_cos_swap),
}


# --- applying them -----------------------------------------------------------------------------------

def _in_function(node: ast.AST) -> bool:
    while node is not None:
        node = getattr(node, "parent", None)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return True
    return False


def _skipped(parent: ast.AST, field: str, child: ast.AST) -> bool:
    """Parts of a module no numerical mutation belongs in."""
    if field in ("decorator_list", "annotation", "returns", "type_comment", "type_params"):
        return True
    if isinstance(child, (ast.Raise, ast.Assert, ast.JoinedStr, ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal)):
        return True
    if isinstance(child, ast.Expr) and isinstance(child.value, ast.Constant) and isinstance(child.value.value, str):
        return True  # a docstring
    return isinstance(parent, ast.If) and field == "test" and all(isinstance(s, ast.Raise) for s in parent.body)


def nodes(tree: ast.AST) -> Iterator[tuple[ast.AST, str]]:
    """Every node an operator may change, with the qualified name of the function or class around it."""
    def walk(node: ast.AST, where: str) -> Iterator[tuple[ast.AST, str]]:
        for field, value in ast.iter_fields(node):
            for child in value if isinstance(value, list) else [value]:
                if not isinstance(child, ast.AST) or _skipped(node, field, child):
                    continue
                inner = where
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    inner = f"{where}.{child.name}" if where else child.name
                yield child, where
                yield from walk(child, inner)
    yield from walk(tree, "")


def unified_diff(before: str, after: str, label: str, context: int = 2) -> str:
    lines = difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                 f"{label}", f"{label} (mutant)", n=context)
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def mutants(path: str | Path, operators: list[str] | None = None, label: str | None = None,
            text: str | None = None) -> list[Mutant]:
    """Every mutant the operators (all, or those named) make of the file at ``path``, in source order.

    ``label`` names the file in ids and diffs (default: its name). Duplicates (two edits giving one
    text) are kept once; an edit that does not parse is dropped.
    """
    path = Path(path)
    text = path.read_text() if text is None else text
    src = Source(text, str(path))
    label = label or path.name
    chosen = [(name, OPERATORS[name][1]) for name in (operators or OPERATORS)]
    found: dict[str, tuple] = {}
    for node, where in nodes(src.tree):
        for name, operator in chosen:
            for change in operator(node, src):
                mutated = src.apply(change)
                if mutated == text or mutated in found:
                    continue
                try:
                    ast.parse(mutated)
                except SyntaxError:
                    continue
                original = text[src.offset(*change.start):src.offset(*change.end)]
                found[mutated] = (change.start, name, change, where, original)
    out, seen = [], {}
    for mutated, (start, name, change, where, original) in sorted(found.items(), key=lambda kv: (kv[1][0], kv[1][1])):
        key = f"{label.removesuffix('.py')}.{start[0]}.{name}"
        seen[key] = seen.get(key, 0) + 1
        ident = key if seen[key] == 1 else f"{key}.{seen[key]}"
        out.append(Mutant(ident, name, str(path), change.start[0], change.end[0], where, original, change.text,
                          mutated, unified_diff(text, mutated, label)))
    return out


def select(candidates: list[Mutant], limit: int | None) -> list[Mutant]:
    """At most ``limit`` mutants, deterministically: operators take turns, each one's picks evenly spread over the
    files (in source order); the result in source order."""
    if limit is None or len(candidates) <= limit:
        return list(candidates)
    groups: dict[str, list[Mutant]] = {}
    for mutant in candidates:
        groups.setdefault(mutant.operator, []).append(mutant)
    quota = dict.fromkeys(groups, 0)
    left = limit
    while left:
        for name in groups:
            if left and quota[name] < len(groups[name]):
                quota[name] += 1
                left -= 1
    chosen = {m.id for name, group in groups.items() for m in
              (group[int((i + 0.5) * len(group) / quota[name])] for i in range(quota[name]))}
    return [m for m in candidates if m.id in chosen]
