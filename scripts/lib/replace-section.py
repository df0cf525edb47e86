"""Puts a Markdown section into a file: the section on standard input starts
with its "## " heading; a section of that heading already in the file is
replaced up to the next "## " heading, else the section is appended.

    python3 scripts/lib/replace-section.py docs/PERFORMANCE.md "## Heading" < section.md
"""
import re
import sys

path, heading = sys.argv[1], sys.argv[2]
section = sys.stdin.read().rstrip() + "\n"
text = open(path).read()
start = text.find(heading + "\n")
if start < 0:
    text = text.rstrip("\n") + "\n\n" + section
else:
    nxt = re.compile(r"^## ", re.M).search(text, start + len(heading))
    rest = text[nxt.start():] if nxt else ""
    text = text[:start] + section + ("\n" + rest if rest else "")
open(path, "w").write(text)
