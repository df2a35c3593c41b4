"""--where: a row filter read as data, never run as code.

    --where "type == 'ChooseAttr' and difficulty >= 2"
    --where "answer in ['red', 'blue'] or not question.str.startswith('Is')"

The text is parsed by Python's own parser (`ast.parse` reads it; nothing is evaluated) and every node is
checked against the short grammar below; anything else is refused with one line, before a row is looked at:

    filter      := filter 'and' filter | filter 'or' filter | 'not' filter | '(' filter ')'
                 | value OP value [OP value ...]             OP: == != < <= > >= in, not in
                 | column '.str.' METHOD '(' text ')'        METHOD: startswith endswith contains
                 | column '.isna()' | column '.notna()'
    value       := column | literal | '[' literal, ... ']'   (a list only on the right of in / not in)
    column      := a name, or `a name with spaces` in backticks (as pandas' query writes it)
    literal     := 'text' | "text" | a number | True | False | None

`&`, `|` and `~` are read as and, or, not (pandas' spelling). The filter is then applied to the table
column by column with pandas' own comparisons; contains matches plain text, not a regular expression.
"""

import ast
import operator
import re

from .errors import UsageError
from .fields import shown

COMPARISONS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
               ast.Gt: operator.gt, ast.GtE: operator.ge}
STRING_METHODS = ("startswith", "endswith", "contains")
NULL_METHODS = ("isna", "notna")
BACKTICKED = re.compile(r"`([^`]*)`")


def apply_where(table, text: str):
    """The rows of `table` for which the filter holds; UsageError for a filter outside the grammar or one that
    names a column the table does not have."""
    tree, columns = parse_where(text)
    missing = [c for c in columns.values() if c not in table.columns]
    if missing:
        raise UsageError(f"--where {shown(text)}: the table has no column '{missing[0]}' (it has "
                         f"{', '.join(map(str, table.columns[:12]))})")
    try:
        keep = _evaluate(tree, table, columns)
    except (TypeError, ValueError) as exc:  # 'a' < 3: values that do not compare
        raise UsageError(f"--where {shown(text)}: {type(exc).__name__}: {shown(exc)}") from None
    if not hasattr(keep, "dtype") or (keep.dtype != bool and str(keep.dtype) != "boolean"):
        raise UsageError(f"--where {shown(text)}: not a condition (compare a column with a value)")
    return table[keep.fillna(False).astype(bool)]


def parse_where(text: str) -> tuple:
    """(the checked syntax tree, {name in the tree: column name}); UsageError for anything not in the grammar."""
    columns = {}

    def alias(match):  # `a column` -> a name Python can parse
        name = f"_column_{len(columns)}"
        columns[name] = match.group(1)
        return name

    try:
        tree = ast.parse(BACKTICKED.sub(alias, text.strip()), mode="eval").body
    except SyntaxError as exc:
        raise UsageError(f"--where {shown(text)}: not a filter ({exc.msg}); write e.g. \"type == 'ChooseAttr'\"") \
            from None
    except (ValueError, RecursionError, MemoryError):  # a NUL character; nesting too deep to parse
        raise UsageError(f"--where {shown(text)}: not a filter (write e.g. \"type == 'ChooseAttr'\")") from None
    try:
        _check(tree, text, columns)
    except RecursionError:
        raise UsageError(f"--where {shown(text)}: nested too deeply") from None
    return tree, columns


def _check(node, text: str, columns: dict) -> None:
    def refuse(what: str):
        raise UsageError(f"--where {shown(text)}: {what} is not allowed (a filter compares columns with values, "
                         "joined by and, or, not; see --help)")

    if isinstance(node, ast.BoolOp):
        for value in node.values:
            _check(value, text, columns)
    elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)):
        _check(node.left, text, columns)
        _check(node.right, text, columns)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.Invert)):
        _check(node.operand, text, columns)
    elif isinstance(node, ast.Compare):
        for op, right in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                if not isinstance(right, (ast.List, ast.Tuple)):
                    refuse("'in' without a [list] of values")
                for item in right.elts:
                    if not _literal(item):
                        refuse("a list item that is not a text, number, True, False or None")
            elif type(op) not in COMPARISONS:
                refuse(f"the comparison '{type(op).__name__}'")
            else:
                _check_value(right, text, columns, refuse)
        _check_value(node.left, text, columns, refuse)
    elif isinstance(node, ast.Call):
        method = node.func
        if not isinstance(method, ast.Attribute) or node.keywords:
            refuse("a call")
        if method.attr in NULL_METHODS and isinstance(method.value, ast.Name) and not node.args:
            _column_name(method.value, columns)
        elif (method.attr in STRING_METHODS and isinstance(method.value, ast.Attribute)
              and method.value.attr == "str" and isinstance(method.value.value, ast.Name)
              and len(node.args) == 1 and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            _column_name(method.value.value, columns)
        else:
            refuse(f"the call '{ast.unparse(node)}' (use COLUMN.str.startswith|endswith|contains('text'), "
                   "COLUMN.isna() or COLUMN.notna())")
    elif isinstance(node, ast.Name):  # a bool column alone
        _column_name(node, columns)
    else:
        refuse(f"'{ast.unparse(node)}'")


def _check_value(node, text: str, columns: dict, refuse) -> None:
    if isinstance(node, ast.Name):
        _column_name(node, columns)
    elif not _literal(node):
        refuse(f"'{ast.unparse(node)}' as a value (use a column, a text, a number, True, False or None)")


def _literal(node) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):  # -3
        node = node.operand
        return isinstance(node, ast.Constant) and type(node.value) in (int, float)
    return isinstance(node, ast.Constant) and (node.value is None or type(node.value) in (str, int, float, bool))


def _column_name(node: ast.Name, columns: dict) -> str:
    return columns.setdefault(node.id, node.id)


def _evaluate(node, table, columns: dict):
    if isinstance(node, ast.BoolOp):
        values = [_evaluate(v, table, columns) for v in node.values]
        combine = operator.and_ if isinstance(node.op, ast.And) else operator.or_
        out = values[0]
        for value in values[1:]:
            out = combine(out, value)
        return out
    if isinstance(node, ast.BinOp):
        combine = operator.and_ if isinstance(node.op, ast.BitAnd) else operator.or_
        return combine(_evaluate(node.left, table, columns), _evaluate(node.right, table, columns))
    if isinstance(node, ast.UnaryOp):
        return ~_evaluate(node.operand, table, columns)
    if isinstance(node, ast.Compare):
        out, left = None, _value(node.left, table, columns)
        for op, right_node in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                items = [_literal_value(item) for item in right_node.elts]
                result = _column_of(left, table).isin(items)
                result = ~result if isinstance(op, ast.NotIn) else result
                right = None
            else:
                right = _value(right_node, table, columns)
                result = _compare(COMPARISONS[type(op)], left, right, table)
            out = result if out is None else out & result
            left = right
        return out
    if isinstance(node, ast.Call):
        method = node.func
        if method.attr in NULL_METHODS:
            column = table[columns[method.value.id]]
            return column.isna() if method.attr == "isna" else column.notna()
        column = table[columns[method.value.value.id]].astype("string")
        argument = node.args[0].value
        if method.attr == "contains":
            found = column.str.contains(argument, regex=False)
        else:
            found = getattr(column.str, method.attr)(argument)
        return found.fillna(False).astype(bool)
    column = table[columns[node.id]]
    if column.dtype != bool and str(column.dtype) != "boolean":
        raise ValueError(f"the column '{columns[node.id]}' alone is not a condition (it is not true/false)")
    return column


def _value(node, table, columns: dict):
    if isinstance(node, ast.Name):
        return table[columns[node.id]]
    return _literal_value(node)


def _literal_value(node):
    if isinstance(node, ast.UnaryOp):
        return -node.operand.value
    return node.value


def _column_of(value, table):
    import pandas as pd

    return value if isinstance(value, pd.Series) else pd.Series([value] * len(table), index=table.index)


def _compare(op, left, right, table):
    import pandas as pd

    if left is None or right is None:  # == None / != None: the missing values
        other = right if left is None else left
        missing = _column_of(other, table).isna()
        if op is operator.eq:
            return missing
        if op is operator.ne:
            return ~missing
        raise ValueError("None only compares with == and !=")
    result = op(_column_of(left, table), right if isinstance(right, pd.Series) else right)
    return result.fillna(False).astype(bool) if result.dtype != bool else result
