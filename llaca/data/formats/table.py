"""CSV and TSV with a header row (image, question, answer; any extra columns are ignored), streamed.

Read with the csv module in strict mode, so an unterminated quote or a row with the wrong number of fields is
reported with its line instead of shifting every later column. Excel's UTF-8 BOM and CRLF ends are accepted.
"""
from __future__ import annotations

import csv
import io

from ..records import Problem


def read_table(source, problems: list, limits):
    name = source.name
    delimiter = "\t" if source.container == "tsv" else ","
    with open(source.path, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        reader = csv.reader(text, delimiter=delimiter, strict=True)
        header = None
        index = 0
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except UnicodeDecodeError as e:
                problems.append(Problem(name, f"not UTF-8 text ({e.reason})", line=line))
                return
            except csv.Error as e:
                problems.append(Problem(name, f"malformed {source.container.upper()}: {e}", line=line,
                                        index=index if header else None, unit="row"))
                return
            if not any(cell.strip() for cell in row):
                continue  # blank line
            if header is None:
                header = [cell.strip() for cell in row]
                duplicates = sorted({c for c in header if header.count(c) > 1})
                if duplicates:
                    problems.append(Problem(name, f"header names column(s) {', '.join(map(repr, duplicates))} twice",
                                            line=line))
                    return
                continue
            if len(row) != len(header):
                problems.append(Problem(name, f"{len(row)} fields, the header has {len(header)} "
                                              f"({', '.join(header)})", line=line, index=index, unit="row"))
            else:
                yield index, line, dict(zip(header, row))
            index += 1
        if header is None:
            problems.append(Problem(name, "no header row (expected e.g. image,question,answer)"))
