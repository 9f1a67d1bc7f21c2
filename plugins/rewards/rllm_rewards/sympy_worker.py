"""Sympy equivalence check, run in a worker process that the parent may kill at any time.

Protocol: one JSON object per line on stdin, ``{"a": str, "b": str}`` (normalised answers);
one JSON object per line on stdout, ``{"equal": true|false|null, "error": str|null}``.
``null`` means "could not decide" (unparsable, too large, unsupported).

Safety: the text is converted from LaTeX to sympy syntax, then checked against an allowlist
(digits, operators, parentheses, commas, single-letter symbols and a few function names) before
``parse_expr`` sees it; ``parse_expr`` gets a globals dict with no builtins. Power towers and huge
exponents are refused before evaluation, and the process caps its address space, so adversarial
input ends in an error, a MemoryError, or the parent's timeout, never a hung trainer.
"""

from __future__ import annotations

import json
import re
import sys

_MAX_LEN = 400
_MAX_EXPONENT = 2000
_FUNCS = ("sqrt", "root", "sin", "cos", "tan", "log", "ln", "exp", "pi", "oo")
_TOKEN_OK = re.compile(r"[0-9A-Za-z+\-*/().,\s]*")
_NAME = re.compile(r"[A-Za-z]+")


def braced(s: str, i: int) -> tuple[str, int]:
    """The content of the brace group starting at ``s[i] == '{'`` and the index after it."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "{":
            depth += 1
        elif s[j] == "}":
            depth -= 1
            if depth == 0:
                return s[i + 1 : j], j + 1
    raise ValueError("unbalanced braces")


def _arg(s: str, i: int) -> tuple[str, int]:
    """One LaTeX macro argument: a brace group or a single character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        raise ValueError("missing argument")
    if s[i] == "{":
        return braced(s, i)
    return s[i], i + 1


def latex_to_sympy(s: str) -> str:
    """Convert the LaTeX subset answers use (frac, sqrt, ^, cdot, pi...) to sympy syntax."""
    for old, new in (
        ("\\cdot", "*"),
        ("\\times", "*"),
        ("\\div", "/"),
        ("\\pi", " pi "),
        ("\\infty", " oo "),
        ("\\ln", " ln "),
        ("\\log", " log "),
        ("\\sin", " sin "),
        ("\\cos", " cos "),
        ("\\tan", " tan "),
        ("\\exp", " exp "),
    ):
        s = s.replace(old, new)
    out: list[str] = []
    i = 0
    while i < len(s):
        if s.startswith("\\frac", i):
            num, i = _arg(s, i + 5)
            den, i = _arg(s, i)
            out.append(f"(({latex_to_sympy(num)})/({latex_to_sympy(den)}))")
        elif s.startswith("\\sqrt", i):
            i += 5
            index = None
            if i < len(s) and s[i] == "[":
                end = s.index("]", i)
                index, i = s[i + 1 : end], end + 1
            body, i = _arg(s, i)
            body = latex_to_sympy(body)
            out.append(f"root(({body}),({latex_to_sympy(index)}))" if index else f"sqrt({body})")
        elif s[i] == "^":
            exp, i = _arg(s, i + 1)
            out.append(f"**({latex_to_sympy(exp)})")
        elif s[i] in "{}":
            out.append("(" if s[i] == "{" else ")")
            i += 1
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _check_allowed(expr: str) -> None:
    if len(expr) > _MAX_LEN:
        raise ValueError("expression too long")
    if not _TOKEN_OK.fullmatch(expr):
        raise ValueError("characters outside the allowlist")
    if re.search(r"\.(?!\d)", expr):
        raise ValueError("'.' only allowed in decimals")
    for name in _NAME.findall(expr):
        if len(name) > 1 and name not in _FUNCS:
            raise ValueError(f"name {name!r} is not allowed")


def _parse(text: str):
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication,
        parse_expr,
        standard_transformations,
    )

    expr = latex_to_sympy(text)
    _check_allowed(expr)
    names = {
        "sqrt": sympy.sqrt,
        "root": sympy.root,
        "sin": sympy.sin,
        "cos": sympy.cos,
        "tan": sympy.tan,
        "log": sympy.log,
        "ln": sympy.log,
        "exp": sympy.exp,
        "pi": sympy.pi,
        "oo": sympy.oo,
    }
    # What parse_expr's generated code refers to; nothing else is reachable (no builtins).
    glob = {"__builtins__": {}}
    for name in ("Integer", "Float", "Rational", "Symbol", "Function", "Add", "Mul", "Pow", "Tuple", "Number"):
        glob[name] = getattr(sympy, name)
    parsed = parse_expr(
        expr,
        local_dict=names,
        global_dict=glob,
        transformations=(*standard_transformations, implicit_multiplication, convert_xor),
        evaluate=False,
    )
    _check_size(parsed)
    return parsed


def _check_size(expr) -> None:
    import sympy

    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Pow):
            base, exp = node.args
            if exp.has(sympy.Pow) and not exp.free_symbols:
                raise ValueError("power tower")
            if isinstance(exp, sympy.Number) and abs(exp) > _MAX_EXPONENT and base not in (0, 1, -1):
                raise ValueError("exponent too large")


def _equal(a, b) -> bool:
    import sympy

    if isinstance(a, tuple | sympy.Tuple) or isinstance(b, tuple | sympy.Tuple):
        if not (isinstance(a, tuple | sympy.Tuple) and isinstance(b, tuple | sympy.Tuple)) or len(a) != len(b):
            return False
        return all(_equal(x, y) for x, y in zip(a, b, strict=True))
    a, b = a.doit(), b.doit()
    diff = sympy.simplify(a - b)
    if diff == 0:
        return True
    if not diff.free_symbols:
        value = sympy.N(diff, 30)
        scale = max(1, abs(sympy.N(b, 30))) if not b.free_symbols else 1
        return bool(value.is_number and abs(value) <= 1e-9 * scale)
    return False


def check(a: str, b: str) -> dict:
    try:
        return {"equal": _equal(_parse(a), _parse(b)), "error": None}
    except Exception as exc:
        return {"equal": None, "error": f"{type(exc).__name__}: {exc}"[:300]}


def main() -> None:
    import resource

    import sympy  # noqa: F401 - import before capping memory

    limit = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 30
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
        pass
    sys.stdout.write('{"ready": true}\n')
    sys.stdout.flush()
    for line in sys.stdin:
        try:
            job = json.loads(line)
            result = check(str(job["a"]), str(job["b"]))
        except MemoryError:
            result = {"equal": None, "error": "MemoryError"}
        except Exception as exc:
            result = {"equal": None, "error": f"bad request: {exc}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
