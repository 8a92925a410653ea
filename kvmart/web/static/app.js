// kvmart market: the two things a server-rendered page cannot do alone. No framework, no build step.
// 1. "Try it": POST the question (with the page's CSRF token) and show the answer as it streams
//    (newline-delimited JSON), then the tokens read from cache vs computed, the time saved and the charge.
// 2. Publish: read a chosen file into the form, send it with upload progress, then show that the provider is
//    prefilling until the document's id comes back.
"use strict";

function $(id) { return document.getElementById(id); }

function errorText(status, body) {
  try { const parsed = JSON.parse(body); return (parsed.error && parsed.error.message) || parsed.error || body; }
  catch (e) { return body || ("HTTP " + status); }
}

async function ask(form) {
  const answer = $("answer"), usage = $("ask-usage"), error = $("ask-error"), button = $("ask-button");
  answer.textContent = ""; usage.hidden = true; error.hidden = true; button.disabled = true;
  answer.classList.add("streaming");
  try {
    const response = await fetch(form.action, {method: "POST", body: new URLSearchParams(new FormData(form)),
                                                headers: {"Accept": "application/x-ndjson"}, credentials: "same-origin"});
    if (!response.ok) { throw new Error(errorText(response.status, await response.text())); }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let pending = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      pending += decoder.decode(value, {stream: true});
      let newline;
      while ((newline = pending.indexOf("\n")) >= 0) {
        const line = pending.slice(0, newline); pending = pending.slice(newline + 1);
        if (line) show(JSON.parse(line));
      }
    }
  } catch (e) {
    error.textContent = e.message; error.hidden = false;
  } finally {
    button.disabled = false; answer.classList.remove("streaming");
  }
}

function show(event) {
  if (event.text !== undefined) { $("answer").textContent += event.text; }
  if (event.error) { $("ask-error").textContent = event.error; $("ask-error").hidden = false; }
  if (event.done) {
    const u = event.usage;
    $("cached-tokens").textContent = u.cached_tokens.toLocaleString() + " tokens (" + u.cache + ")";
    $("computed-tokens").textContent = u.computed_tokens.toLocaleString() + " tokens";
    $("output-tokens").textContent = u.tokens.output.toLocaleString() + " tokens";
    $("time-saved").textContent = (1000 * u.prefill_seconds_saved).toFixed(1) + " ms";
    $("charged").textContent = u.charge ? "$" + u.charge.usd + " (saved $" + u.charge.saved_vs_prefill_usd + ")" : "not metered";
    $("ask-usage").hidden = false;
  }
}

function publish(form) {
  const progress = $("publish-progress"), bar = progress.querySelector(".bar"), label = progress.querySelector(".label");
  const result = $("publish-result"), button = $("publish-button");
  const body = new URLSearchParams(new FormData(form)).toString();
  const xhr = new XMLHttpRequest();
  progress.hidden = false; progress.classList.remove("busy"); result.hidden = true; button.disabled = true;
  bar.style.width = "0%"; label.textContent = "uploading";
  xhr.upload.onprogress = (e) => {
    if (e.lengthComputable) { bar.style.width = (100 * e.loaded / e.total).toFixed(0) + "%"; }
  };
  xhr.upload.onload = () => {
    progress.classList.add("busy"); bar.style.width = "100%";
    label.textContent = "prefilling on the provider (once)…";
  };
  xhr.onload = () => {
    button.disabled = false; progress.hidden = true;
    result.hidden = false;
    if (xhr.status === 200 || xhr.status === 201) {
      const doc = JSON.parse(xhr.responseText);
      result.className = "flash good";
      result.textContent = (doc.computed ? "Published " : "Already published: ") + (doc.title || doc.id) + ", " +
        doc.num_tokens.toLocaleString() + " tokens, precompute fee $" + doc.precompute_charge_usd + ". ";
      const link = document.createElement("a");
      link.href = "/documents/" + doc.id; link.textContent = "Open it"; link.id = "published-link";
      result.appendChild(link);
    } else {
      result.className = "flash bad";
      result.textContent = errorText(xhr.status, xhr.responseText);
    }
  };
  xhr.onerror = () => { button.disabled = false; progress.hidden = true; result.hidden = false;
                        result.className = "flash bad"; result.textContent = "the upload failed"; };
  xhr.open("POST", form.action);
  xhr.setRequestHeader("Content-Type", "application/x-www-form-urlencoded");
  xhr.setRequestHeader("Accept", "application/json");
  xhr.send(body);
}

async function readFile(input) {
  const file = input.files[0];
  if (!file) return;
  $("publish-text").value = await file.text();
  $("publish-source").value = file.name;
  if (!$("publish-title").value) { $("publish-title").value = file.name.replace(/\.[^.]*$/, ""); }
}

document.addEventListener("DOMContentLoaded", () => {
  const askForm = $("ask-form");
  if (askForm) askForm.addEventListener("submit", (e) => { e.preventDefault(); ask(askForm); });
  const publishForm = $("publish-form");
  if (publishForm) publishForm.addEventListener("submit", (e) => { e.preventDefault(); publish(publishForm); });
  const file = $("publish-file");
  if (file) file.addEventListener("change", () => readFile(file));
});
