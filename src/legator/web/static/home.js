// The home page's "Unlink" button: DELETE /api/v1/me/identities with the session cookie.
// A script file, not inline: the Content-Security-Policy allows scripts from 'self' only.
// The server takes a cookie-authenticated write only with our own Origin, which the browser
// sends with this same-origin fetch.
"use strict";

const unlink = document.getElementById("sso-unlink");
const problem = document.getElementById("sso-unlink-error");

unlink?.addEventListener("click", async () => {
  if (!window.confirm("Unlink single sign-on? You will sign in with your password.")) return;
  unlink.disabled = true;
  let message = "Unlinking failed. Please try again.";
  try {
    const response = await fetch(unlink.dataset.url, {
      method: "DELETE",
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    });
    if (response.ok) {
      window.location.assign("/");
      return;
    }
    message = (await response.json()).error?.message ?? message;
  } catch {
    // A network error, or an answer that is not our JSON error: the generic message.
  }
  problem.textContent = message;
  problem.hidden = false;
  unlink.disabled = false;
});
