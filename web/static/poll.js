// Waits for a job shown on the page to finish, then reloads so the server renders the result.
(function () {
  var box = document.querySelector("[data-poll]");
  if (!box) return;
  var url = box.getAttribute("data-poll");
  var delay = 400;
  function check() {
    fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (job) {
        if (job && ["succeeded", "failed", "cancelled"].indexOf(job.status) >= 0) {
          window.location.reload();
          return;
        }
        delay = Math.min(delay * 1.5, 3000);
        setTimeout(check, delay);
      })
      .catch(function () { setTimeout(check, 3000); });
  }
  setTimeout(check, delay);
})();
