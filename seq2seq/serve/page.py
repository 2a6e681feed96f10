"""The page at ``/``: type a text, pick the language pair, translate, and for one sentence see
the attention the model produced. Plain HTML and a little JavaScript calling ``/languages`` and
``/translate`` like any other client."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>seq2seq translate</title>
<style>
  body { font-family: sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }
  textarea { width: 100%; height: 6rem; font-size: 1rem; }
  #result { white-space: pre-wrap; border: 1px solid #aaa; min-height: 3rem; padding: .5rem;
            margin: .5rem 0; font-size: 1.1rem; }
  #error { color: #b00; }
  table.heatmap { border-collapse: collapse; font-size: .8rem; margin-top: .5rem; }
  table.heatmap td { width: 1.6rem; height: 1.6rem; border: 1px solid #eee; }
  table.heatmap th { font-weight: normal; padding: 0 .3rem; }
  table.heatmap thead th { writing-mode: vertical-rl; transform: rotate(180deg);
                           text-align: left; }
  table.heatmap tbody th { text-align: right; }
</style>
</head>
<body>
<h1>seq2seq</h1>
<p>
  <label>Language pair <select id="pair"></select></label>
  <label>API key (if the server needs one) <input id="key" type="password" size="12"></label>
</p>
<textarea id="text" placeholder="Type a sentence"></textarea>
<p><button id="translate">Translate</button></p>
<div id="result" aria-live="polite"></div>
<div id="error"></div>
<div id="attention"></div>
<script>
const $ = (id) => document.getElementById(id);

async function loadPairs() {
  const languages = await (await fetch("languages")).json();
  const names = Object.fromEntries(languages.map((l) => [l.code, l.name]));
  for (const language of languages) {
    for (const target of language.targets) {
      const option = document.createElement("option");
      option.value = language.code + ":" + target;
      option.textContent = names[language.code] + " \\u2192 " + names[target];
      $("pair").appendChild(option);
    }
  }
}

function heatmap(attention) {
  const table = document.createElement("table");
  table.className = "heatmap";
  table.id = "heatmap";
  const head = table.createTHead().insertRow();
  head.appendChild(document.createElement("th"));
  for (const piece of attention.src) {
    const th = document.createElement("th");
    th.textContent = piece;
    head.appendChild(th);
  }
  const body = table.createTBody();
  attention.weights.forEach((row, i) => {
    const tr = body.insertRow();
    const th = document.createElement("th");
    th.textContent = attention.hyp[i];
    tr.appendChild(th);
    // Shaded against the row's largest weight, so a diffuse row still shows where it looks.
    const top = Math.max(...row) || 1;
    row.forEach((weight) => {
      const td = tr.insertCell();
      td.style.background = "rgba(30, 80, 200, " + (weight / top) + ")";
      td.title = weight.toFixed(3);
    });
  });
  return table;
}

async function translate() {
  const [source, target] = $("pair").value.split(":");
  $("error").textContent = "";
  $("attention").replaceChildren();
  $("result").textContent = "\\u2026";
  const request = {q: $("text").value, source, target, format: "text", attention: true};
  if ($("key").value) request.api_key = $("key").value;
  try {
    const response = await fetch("translate", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify(request)});
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || response.statusText);
    $("result").textContent = answer.translatedText;
    if (answer.attention) {
      const caption = document.createElement("p");
      caption.textContent = "Attention (rows: output pieces, columns: input pieces)";
      $("attention").append(caption, heatmap(answer.attention));
    }
  } catch (error) {
    $("result").textContent = "";
    $("error").textContent = String(error.message || error);
  }
}

$("translate").addEventListener("click", translate);
loadPairs().catch((error) => { $("error").textContent = String(error); });
</script>
</body>
</html>
"""
