// Sign-in: post the key; the service answers with an HttpOnly cookie, then go where we were sent from.
"use strict";
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
    // only paths of this site: never bounce a signed-in user to another origin
    location.href = next.startsWith("/") && !next.startsWith("//") ? next : "/screen";
    return;
  }
  const body = await response.json().catch(() => ({}));
  error.textContent = body.error || `sign-in failed (${response.status})`;
});
