"""The HTML playground served at `/`: a prompt box, a seed, an optional API key and the image.
Plain HTML and fetch(), no build step. `/?prompt=...&seed=...` generates on load (handy for a
link, and how the headless-browser test drives it)."""

from __future__ import annotations

import html

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body {{ font-family: system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }}
 label {{ display: block; margin-top: .6rem; }} input {{ width: 100%; padding: .3rem; box-sizing: border-box; }}
 button {{ margin-top: .8rem; padding: .4rem 1.2rem; }}
 #result {{ margin-top: 1rem; width: 256px; height: 256px; image-rendering: pixelated; border: 1px solid #ccc; }}
 #status {{ margin-top: .5rem; color: #555; min-height: 1.2em; }} #status.error {{ color: #b00; }}
</style></head>
<body>
<h1>{title}</h1>
<p>Scale-wise distilled generator. API: <code>POST {base}/v1/images/generations</code>,
 <code>GET {base}/generate?prompt=...&amp;seed=...</code>, <code>GET {base}/v1/models</code>.</p>
<form id="form">
 <label>Prompt <input id="prompt" name="prompt" required \
value="a large red circle in the center on a white background"></label>
 <label>Seed <input id="seed" name="seed" type="number" min="0" step="1" value="0"></label>
 <label>API key (only if the server requires one) \
<input id="key" name="key" type="password" autocomplete="off"></label>
 <button id="go" type="submit">Generate</button>
</form>
<div id="status"></div>
<img id="result" alt="generated image">
<script>
const base = {base_js};
const $ = (id) => document.getElementById(id);
async function generate() {{
  const status = $("status");
  status.className = ""; status.textContent = "generating...";
  const body = {{prompt: $("prompt").value, n: 1, response_format: "b64_json"}};
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  const headers = {{"Content-Type": "application/json"}};
  if ($("key").value) headers["Authorization"] = "Bearer " + $("key").value;
  const t0 = performance.now();
  try {{
    const r = await fetch(base + "/v1/images/generations", {{method: "POST", headers, body: JSON.stringify(body)}});
    const j = await r.json();
    if (!r.ok) throw new Error((j.error && j.error.message) || r.statusText);
    $("result").src = "data:image/png;base64," + j.data[0].b64_json;
    $("result").dataset.seed = j.data[0].seed;
    status.textContent = `seed ${{j.data[0].seed}}, ${{Math.round(performance.now() - t0)}} ms`;
    document.body.dataset.state = "done";
  }} catch (e) {{
    status.className = "error"; status.textContent = "error: " + e.message;
    document.body.dataset.state = "error";
  }}
}}
$("form").addEventListener("submit", (e) => {{ e.preventDefault(); generate(); }});
const q = new URLSearchParams(location.search);
if (q.has("prompt")) {{
  $("prompt").value = q.get("prompt");
  if (q.has("seed")) $("seed").value = q.get("seed");
  generate();
}}
</script>
</body></html>
"""


def playground_html(title: str, base: str) -> str:
    """`base` is the app's route prefix as the client sees it (the ASGI root_path)."""
    import json

    base = base.rstrip("/")
    return PAGE.format(title=html.escape(title), base=html.escape(base), base_js=json.dumps(base))
