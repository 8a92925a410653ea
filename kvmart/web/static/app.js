// kvmart market: the two things a server-rendered page cannot do alone. No framework, no build step.
// 1. "Try it": POST the question (with the page's CSRF token), show at once that it is waiting for the first
//    token, then the answer as it streams (newline-delimited JSON), the time to first token, the tokens read from
//    cache vs computed, the time saved and the charge.
// 2. Publish: read a chosen file into the form, send it with upload progress, show that the provider is
//    prefilling until the document's id comes back, then refresh the page's list, tiles and chart and clear the form.
"use strict";

function $(id) { return document.getElementById(id); }

// Seconds as the server's pages write them (kvmart/web/formatting.py): "0.004 s", "3.41 s", "14,378 s".
function seconds(value) {
  if (value < 1) return value.toFixed(3) + " s";
  if (value < 100) return value.toFixed(2) + " s";
  return Math.round(value).toLocaleString("en-US") + " s";
}

function errorText(status, body) {
  try { const parsed = JSON.parse(body); return (parsed.error && parsed.error.message) || parsed.error || body; }
  catch (e) { return body || ("HTTP " + status); }
}

async function ask(form) {
  const answer = $("answer"), usage = $("ask-usage"), error = $("ask-error"), button = $("ask-button");
  const status = $("ask-status"), clock = {started: performance.now(), first: null};
  answer.textContent = ""; usage.hidden = true; error.hidden = true; button.disabled = true;
  answer.classList.add("streaming");
  status.textContent = "Waiting for the first token…"; status.hidden = false; status.classList.add("waiting");
  const show = (event) => {
    if (event.text && clock.first === null) {
      clock.first = performance.now();
      status.classList.remove("waiting");
      status.textContent = "First token after " + seconds((clock.first - clock.started) / 1000);
    }
    showEvent(event);
  };
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
    const total = seconds((performance.now() - clock.started) / 1000);
    status.textContent = clock.first === null ? "No text generated · done in " + total :
      "First token after " + seconds((clock.first - clock.started) / 1000) + " · answer complete in " + total;
  } catch (e) {
    error.textContent = e.message; error.hidden = false; status.hidden = true;
  } finally {
    button.disabled = false; answer.classList.remove("streaming"); status.classList.remove("waiting");
  }
}

function showEvent(event) {
  if (event.text !== undefined) { $("answer").textContent += event.text; }
  if (event.error) { $("ask-error").textContent = event.error; $("ask-error").hidden = false; }
  if (event.done) {
    const u = event.usage;
    $("cached-tokens").textContent = u.cached_tokens.toLocaleString() + " tokens (" + u.cache + ")";
    $("computed-tokens").textContent = u.computed_tokens.toLocaleString() + " tokens";
    $("output-tokens").textContent = u.tokens.output.toLocaleString() + " tokens";
    $("time-saved").textContent = seconds(u.prefill_seconds_saved);
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
  xhr.onload = async () => {
    button.disabled = false; progress.hidden = true;
    if (xhr.status === 200 || xhr.status === 201) {
      const doc = JSON.parse(xhr.responseText);
      form.reset(); $("publish-source").value = "";  // (reset leaves a hidden input's value as it is)
      await refreshPublisher();
      result.className = "flash good";
      result.textContent = (doc.computed ? "Published " : "Already published: ") + (doc.title || doc.id) + ", " +
        doc.num_tokens.toLocaleString() + " tokens, precompute fee $" + doc.precompute_charge_usd + ". ";
      const link = document.createElement("a");
      link.href = "/documents/" + doc.id; link.textContent = "Open it"; link.id = "published-link";
      result.appendChild(link);
      result.hidden = false;
    } else {
      result.hidden = false;
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

// The publisher's figures as the server now renders them: its tiles, its documents and their chart (the rest of
// the page, the form with what the publisher may be typing next, stays as it is).
async function refreshPublisher() {
  try {
    const response = await fetch("/publisher", {credentials: "same-origin", headers: {"Accept": "text/html"}});
    if (!response.ok) return;
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    for (const id of ["account-tiles", "my-documents", "royalty-chart", "get-funds"]) {
      const now = $(id), next = fresh.getElementById(id);
      if (now && next) now.replaceWith(document.importNode(next, true));
    }
  } catch (e) { /* the publish itself succeeded: a reload shows the figures */ }
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
