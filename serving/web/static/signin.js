// Sign-in: post the key; the service answers with an HttpOnly cookie, then go where we were sent from.
"use strict";

// only paths of this site: never bounce a signed-in user to another origin. The URL parser decides,
// as the browser will: "/\evil.example" or "/<tab>/evil.example" look like paths but lead elsewhere.
function sameSitePath(next) {
  try {
    const url = new URL(next, location.origin);
    // the absolute URL, not its path: "/.//evil.example" normalises to the path "//evil.example"
    if (url.origin === location.origin) return url.href;
  } catch {
    // not a URL at all: fall through to the screen
  }
  return "/screen";
}

document.getElementById("signin").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = document.getElementById("error");
  error.textContent = "";
  const key = document.getElementById("key").value.trim();
  const response = await fetch("/signin", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ key }),
  });
  if (response.status === 204) {
    // the page's #fragment (e.g. #inspection=12 from a screen thumbnail) survives the redirect here
    const next = (new URLSearchParams(location.search).get("next") || "/screen") + location.hash;
    location.href = sameSitePath(next);
    return;
  }
  const body = await response.json().catch(() => ({}));
  error.textContent = body.error || `sign-in failed (${response.status})`;
});
