"""The join of the page's ES modules (registry.web.bundle): what it refuses, and, run in
chromium, that it evaluates modules like the browser would (dependencies first, each module's
private names its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from registry.web.bundle import BundleError, bundle_modules


def _write(directory: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def test_bundle_runs_like_the_browser_would(tmp_path: Path, browser: Any) -> None:
    # Both leaf modules have a private `seen` and `label`: one scope each, or a SyntaxError.
    modules = {
        "a.js": 'const seen = "a";\nwindow.order.push(seen);\nexport const label = (x) => `a:${x}`;\n'
        "export function twice(x) { return x * 2; }\n",
        "b.js": 'import { twice } from "./a.js";\nconst seen = "b";\nwindow.order.push(seen);\n'
        "export async function label(x) { return `b:${twice(x)}`; }\n"
        "export class Box { constructor(v) { this.v = v; } }\n",
        "main.js": 'import { label } from "./a.js";\nimport { Box, label as _ } from "./b.js";\n',
    }
    with pytest.raises(BundleError, match=r"main\.js: unsupported import.*label as _"):
        bundle_modules(_write(tmp_path, modules), "main.js")
    modules["main.js"] = (
        'import { twice, label } from "./a.js";\n'
        'import {\n  Box,\n} from "./b.js";\n'
        'window.order.push("main");\nwindow.result = [label(1), twice(4), new Box(7).v, typeof seen];\n'
    )
    source = bundle_modules(_write(tmp_path, modules), "main.js")
    context = browser.new_context()
    try:
        page = context.new_page()
        page.evaluate("window.order = []")
        page.add_script_tag(content=source)
        # a before b (b imports a), both before main: the order of a browser's module graph
        assert page.evaluate("window.order") == ["a", "b", "main"]
        assert page.evaluate("window.result") == ["a:1", 8, 7, "undefined"]
    finally:
        context.close()


@pytest.mark.parametrize(
    ("main", "extra", "message"),
    [
        ('import * as a from "./a.js";\n', {}, r"main\.js: only `import \{ \.\.\. \}"),
        ('import a from "./a.js";\n', {}, r"main\.js: only `import \{ \.\.\. \}"),
        ('const m = import("./a.js");\n', {}, r"main\.js: only `import \{ \.\.\. \}"),
        ('import { nope } from "./a.js";\n', {}, r"main\.js: a\.js exports no \['nope'\]"),
        ('import { x } from "./missing.js";\n', {}, r"missing\.js: no such module"),
        ("export default 1;\n", {}, r"main\.js: only `export function\|class\|const name`"),
        ("export let counter = 0;\n", {}, r"main\.js: only `export function\|class\|const name`"),
        ("const x = 1;\nexport { x };\n", {}, r"main\.js: only `export function\|class\|const name`"),
        ('import { x } from "./c.js";\n', {"c.js": 'import { y } from "./d.js";\nexport const x = 1;\n',
                                          "d.js": 'import { x } from "./c.js";\nexport const y = 1;\n'},
         r"c\.js: import cycle"),
    ],
)  # fmt: skip
def test_bundle_refuses_what_it_cannot_join(tmp_path: Path, main: str, extra: dict[str, str], message: str) -> None:
    _write(tmp_path, {"a.js": "export const a = 1;\n", "main.js": main, **extra})
    with pytest.raises(BundleError, match=message):
        bundle_modules(tmp_path, "main.js")
