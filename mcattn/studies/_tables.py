"""The one Markdown-table writer of the studies (the tables of docs/<method>.md)."""

__all__ = ["markdown_table"]


def markdown_table(header, rows, align=None):
    """A Markdown table: the header line, the rule, one line per row.

    Parameters
    ----------
    header : sequence of str, length ``n``
        The column titles.
    rows : iterable of sequences, each of length ``n``
        The cells, already formatted (``str`` is applied to each).
    align : str of length ``n``, optional
        ``"l"`` (rule ``---``) or ``"r"`` (rule ``---:``) per column; default all ``"l"``.

    Returns
    -------
    str
        The lines joined by ``"\\n"``, no trailing newline: ``| a | b |``, ``|---|---:|``,
        ... An empty cell is written as a single space (``| | b |``).
    """
    header = [str(c) for c in header]
    n = len(header)
    align = "l" * n if align is None else align
    if len(align) != n or not set(align) <= {"l", "r"}:
        raise ValueError(f"align must be {n} characters 'l' or 'r', one per column; got {align!r}")

    def line(cells):
        cells = [str(c) for c in cells]
        if len(cells) != n:
            raise ValueError(f"a row must have {n} cells, as the header; got {len(cells)}: {cells}")
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align)
    return "\n".join([line(header), rule] + [line(row) for row in rows])
