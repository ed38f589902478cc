// The sign-in form: the key goes to POST /v1/session once, in the Authorization header; the answer sets
// an HttpOnly session cookie, and the key is dropped from the page.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("sign-in-form");
  const input = document.getElementById("api-key");
  const error = document.getElementById("sign-in-error");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    const key = input.value.trim();
    input.value = "";
    try {
      await xrayq.api("POST", "/v1/session", { headers: { Authorization: `Bearer ${key}` } });
      location.reload();
    } catch (failure) {
      error.textContent = failure.status === 401 ? "That key is unknown or revoked." : failure.message;
      error.hidden = false;
    }
  });
});
