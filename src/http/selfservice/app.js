// pdvault self-service page. Plain ES2020, no dependencies, no inline code
// (the page is served under a strict Content-Security-Policy).
//
// Rules kept throughout:
//  * every value from the server is inserted with textContent, never as HTML;
//  * the session token lives only in the `session` variable below, never in
//    a cookie or Web Storage, and is forgotten on sign-out (which also revokes
//    it in the vault), expiry or erasure;
//  * every user-visible string comes from the i18n catalogues.
"use strict";

(() => {
  const LANGS = ["ru", "kk", "en"];
  const LOCALES = { ru: "ru-RU", kk: "kk-KZ", en: "en-GB" };
  const PURPOSE = "subject_access";

  const TEXT_FIELDS = ["surname", "given_name", "patronymic", "phone", "email"];
  const ADDRESS_KEYS = ["country", "region", "city", "street", "building", "apartment", "postal_code", "comment"];
  const ALL_FIELDS = [...TEXT_FIELDS, "address"];
  const INPUT_TYPES = { phone: "tel", email: "email" };
  const AUTOCOMPLETE = {
    surname: "family-name", given_name: "given-name", patronymic: "additional-name",
    phone: "tel", email: "email",
    country: "country-name", region: "address-level1", city: "address-level2",
    postal_code: "postal-code",
  };

  // Purposes and the policy clause each one rests on.
  const CLAUSES = {
    order: "3.2.1", payment: "3.2.2", delivery: "3.2.3", support: "3.2.4",
    personalization: "3.2.5", notifications: "3.2.6", service_improvement: "3.2.7",
    marketing: "3.2.8", statistics: "3.2.9", subject_access: "4.2.1",
    legal_request: "4.3.2", erasure: "",
  };

  const LOG_PAGE_SIZE = 20;
  const LOG_FETCH_LIMIT = 100;
  const LOG_MAX_PAGES = 20;
  const MAX_TIMEOUT = 2147483647;

  // ---- state -------------------------------------------------------------

  let lang = "ru";
  let dict = {};
  const catalogues = {};

  // The session: { token, subject, expiresAt, timer }. Nothing else holds the token.
  let session = null;
  let generation = 0; // bumped whenever the session ends; late answers are dropped

  let subjectData = null;   // GET subject answer
  let consentData = null;   // GET consents answer
  let logEntries = [];      // releases, newest first
  let logTruncated = false;
  let logPage = 0;
  let erasure = null;       // DELETE answer

  // Messages shown in elements, kept as functions so a language switch re-renders them.
  const messages = new Map();

  const $ = (id) => document.getElementById(id);

  // ---- i18n --------------------------------------------------------------

  function t(key, params) {
    let s = Object.prototype.hasOwnProperty.call(dict, key) ? dict[key] : key;
    if (params) {
      s = s.replace(/\{(\w+)\}/g, (m, name) =>
        Object.prototype.hasOwnProperty.call(params, name) ? String(params[name]) : m);
    }
    return s;
  }

  function has(key) {
    return Object.prototype.hasOwnProperty.call(dict, key);
  }

  async function loadCatalogue(code) {
    if (!catalogues[code]) {
      const r = await fetch(`i18n/${code}.json`, { credentials: "omit", cache: "no-store" });
      if (!r.ok) throw new Error(`catalogue ${code}: ${r.status}`);
      catalogues[code] = await r.json();
    }
    return catalogues[code];
  }

  async function setLang(code) {
    if (!LANGS.includes(code)) return;
    try {
      dict = await loadCatalogue(code);
    } catch (e) {
      if (Object.keys(dict).length) return; // keep the current language
      dict = {};
    }
    lang = code;
    document.documentElement.lang = code;
    for (const c of LANGS) {
      const b = $(`lang-${c}`);
      if (b) b.setAttribute("aria-pressed", String(c === code));
    }
    applyStatic();
    renderAll();
  }

  function applyStatic() {
    document.title = t("page_title");
    for (const el of document.querySelectorAll("[data-i18n]")) {
      el.textContent = t(el.dataset.i18n);
    }
    for (const el of document.querySelectorAll("[data-i18n-aria]")) {
      el.setAttribute("aria-label", t(el.dataset.i18nAria));
    }
  }

  function fmtDate(s) {
    if (!s) return "";
    const d = new Date(s);
    if (Number.isNaN(d.getTime())) return String(s);
    return d.toLocaleString(LOCALES[lang] || "ru-RU");
  }

  function fieldLabel(name) {
    const n = String(name);
    if (has(`field_${n}`)) return t(`field_${n}`);
    const m = /^address[./](\w+)$/.exec(n);
    if (m && has(`addr_${m[1]}`)) return `${t("field_address")}: ${t(`addr_${m[1]}`)}`;
    return n;
  }

  // The server's 422 reasons (src/fields.rs) are short English texts; these
  // map each one to a catalogue key. Anything unrecognised returns null and
  // the English reason is shown as before.
  const REASONS = [
    [/^contains a control character$/, () => t("reason_control_character")],
    [/^must be 1 to (\d+) characters$/, (m) => t("reason_length_range", { n: m[1] })],
    [/^contains a character not allowed in a phone number$/, () => t("reason_phone_character")],
    [/^is not a valid phone number$/, () => t("reason_invalid_phone")],
    [/^is not a valid email address$/, () => t("reason_invalid_email")],
    [/^must be at most (\d+) characters$/, (m) => t("reason_max_length", { n: m[1] })],
    [/^must be a string$/, () => t("reason_must_be_string")],
    [/^must be an object$/, () => t("reason_must_be_object")],
    [/^address needs at least a region, city, street or postal_code$/, () => t("reason_address_needs_locating")],
    [/^unknown address key: ([a-z0-9_]+)$/, (m) => t("reason_unknown_address_key_named", { key: m[1] })],
    [/^unknown address key$/, () => t("reason_unknown_address_key")],
    [/^country is not an ISO 3166-1 alpha-2 code$/, () => t("reason_country_code")],
    [/^postal_code must be 3 to 10 letters, digits, spaces or hyphens$/, () => t("reason_postal_code")],
  ];
  const ADDRESS_PART_REASON = new RegExp(`^(${ADDRESS_KEYS.join("|")}) (.+)$`);

  // Localised text for a server reason, or null when it is not recognised.
  function localReason(reason) {
    const r = String(reason);
    for (const [re, fn] of REASONS) {
      const m = re.exec(r);
      if (m) return fn(m);
    }
    // "{key} {text reason}" for one part of an address.
    const m = ADDRESS_PART_REASON.exec(r);
    if (m && has(`addr_${m[1]}`)) {
      const inner = localReason(m[2]);
      if (inner !== null) return t("reason_address_part", { part: t(`addr_${m[1]}`), reason: inner });
    }
    return null;
  }

  function purposeLabel(p) {
    const name = has(`purpose_${p}`) ? t(`purpose_${p}`) : String(p || "");
    const clause = CLAUSES[p];
    return clause ? t("purpose_clause", { name, clause }) : name;
  }

  // ---- messages ----------------------------------------------------------

  function say(el, fn) {
    if (typeof el === "string") el = $(el);
    if (!el) return;
    if (fn) {
      messages.set(el, fn);
      el.textContent = fn();
    } else {
      messages.delete(el);
      el.textContent = "";
    }
  }

  function rerenderMessages() {
    for (const [el, fn] of messages) el.textContent = fn();
  }

  function clearMessages() {
    for (const el of messages.keys()) el.textContent = "";
    messages.clear();
  }

  // A generic text for a failed request.
  function failure(err) {
    if (err && err.status) return () => t("error_generic", { status: err.status });
    return () => t("error_network");
  }

  // ---- screens -----------------------------------------------------------

  const SCREENS = ["screen-loading", "screen-main", "screen-expired", "screen-erased", "screen-signed-out"];

  function show(id) {
    for (const s of SCREENS) $(s).hidden = s !== id;
    const h = $(id).querySelector("h1");
    if (h && id !== "screen-main") {
      h.tabIndex = -1;
      h.focus();
    }
  }

  // ---- session -----------------------------------------------------------

  class SessionEnded extends Error {}

  class ApiError extends Error {
    constructor(status, problem) {
      super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
      this.status = status;
      this.problem = problem || {};
    }
  }

  function forgetSession() {
    generation += 1;
    if (session && session.timer) clearTimeout(session.timer);
    session = null;
    subjectData = null;
    consentData = null;
    logEntries = [];
    logTruncated = false;
    logPage = 0;
    clearMessages();
    $("erase-confirm-box").hidden = true;
    renderAll();
  }

  function expire() {
    forgetSession();
    show("screen-expired");
  }

  function armTimer() {
    const at = Date.parse(session.expiresAt);
    if (Number.isNaN(at)) return;
    const tick = () => {
      if (!session) return;
      const left = at - Date.now();
      if (left <= 0) {
        expire();
      } else {
        session.timer = setTimeout(tick, Math.min(left, MAX_TIMEOUT));
      }
    };
    tick();
  }

  async function startSession(code) {
    let r;
    try {
      r = await fetch("/v1/self/session", {
        method: "POST",
        credentials: "omit",
        cache: "no-store",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ code }),
      });
    } catch (e) {
      show("screen-expired");
      return;
    }
    if (r.status !== 201) {
      show("screen-expired");
      return;
    }
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!body || !body.token || !body.subject) {
      show("screen-expired");
      return;
    }
    session = { token: body.token, subject: String(body.subject), expiresAt: body.expires_at, timer: null };
    armTimer();
    if (!session) return; // already expired
    renderSessionInfo();
    show("screen-main");
    await Promise.all([loadSubject(), loadConsents(), loadLog()]);
  }

  // ---- API ---------------------------------------------------------------

  function subjectPath(suffix) {
    return `/v1/subjects/${encodeURIComponent(session.subject)}${suffix || ""}`;
  }

  async function api(method, path, body, extra) {
    if (!session) throw new SessionEnded();
    const gen = generation;
    const headers = {
      Authorization: `Bearer ${session.token}`,
      "X-Purpose": PURPOSE,
      Accept: "application/json, application/problem+json",
      ...(extra || {}),
    };
    const init = { method, headers, credentials: "omit", cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    if (gen !== generation) throw new SessionEnded();
    let data = null;
    const text = await r.text();
    if (gen !== generation) throw new SessionEnded();
    if (text) {
      try { data = JSON.parse(text); } catch (e) { data = null; }
    }
    if (r.status === 401) {
      expire();
      throw new SessionEnded();
    }
    if (!r.ok) throw new ApiError(r.status, data);
    return data;
  }

  // Runs fn; a SessionEnded is silent, other errors go to onError.
  async function guarded(fn, onError) {
    try {
      return await fn();
    } catch (e) {
      if (e instanceof SessionEnded) return undefined;
      if (onError) await onError(e);
      else console.error(e);
      return undefined;
    }
  }

  // ---- my data -----------------------------------------------------------

  function buildFields() {
    const root = $("fields");
    for (const f of ALL_FIELDS) {
      const card = document.createElement("div");
      card.className = "field";
      card.id = `field-${f}`;

      const h = document.createElement("h3");
      h.dataset.fieldLabel = f;
      card.append(h);

      const value = document.createElement("p");
      value.id = `value-${f}`;
      value.className = "value";
      card.append(value);

      const form = document.createElement("form");
      form.id = `form-${f}`;
      form.noValidate = true;
      form.className = "edit";

      if (f === "address") {
        const fs = document.createElement("fieldset");
        const lg = document.createElement("legend");
        lg.dataset.i18n = "address_change";
        fs.append(lg);
        const grid = document.createElement("div");
        grid.className = "grid";
        for (const k of ADDRESS_KEYS) {
          const wrap = document.createElement("div");
          wrap.className = k === "comment" ? "row wide" : "row";
          const label = document.createElement("label");
          label.htmlFor = `input-address-${k}`;
          label.dataset.i18n = `addr_${k}`;
          const input = document.createElement("input");
          input.type = "text";
          input.id = `input-address-${k}`;
          input.name = k;
          input.autocomplete = AUTOCOMPLETE[k] || "off";
          wrap.append(label, input);
          grid.append(wrap);
        }
        fs.append(grid);
        form.append(fs);
      } else {
        const wrap = document.createElement("div");
        wrap.className = "row";
        const label = document.createElement("label");
        label.htmlFor = `input-${f}`;
        label.dataset.newValueFor = f;
        const input = document.createElement("input");
        input.type = INPUT_TYPES[f] || "text";
        input.id = `input-${f}`;
        input.name = f;
        input.autocomplete = AUTOCOMPLETE[f] || "off";
        wrap.append(label, input);
        form.append(wrap);
      }

      const actions = document.createElement("div");
      actions.className = "actions";
      const save = document.createElement("button");
      save.type = "submit";
      save.id = `save-${f}`;
      save.dataset.i18n = "save";
      const remove = document.createElement("button");
      remove.type = "button";
      remove.id = `remove-${f}`;
      remove.className = "secondary";
      remove.dataset.i18n = "remove";
      actions.append(save, remove);
      form.append(actions);

      const status = document.createElement("p");
      status.id = `status-${f}`;
      status.className = "status";
      status.setAttribute("role", "status");
      const error = document.createElement("p");
      error.id = `error-${f}`;
      error.className = "error";
      error.setAttribute("role", "alert");
      form.append(status, error);

      form.addEventListener("submit", (ev) => {
        ev.preventDefault();
        saveField(f);
      });
      remove.addEventListener("click", () => removeField(f));

      card.append(form);
      root.append(card);
    }
  }

  function addressLine(a) {
    if (!a || typeof a !== "object") return "";
    return ADDRESS_KEYS
      .map((k) => (a[k] === undefined || a[k] === null ? "" : String(a[k]).trim()))
      .filter((s) => s !== "")
      .join(", ");
  }

  function renderFieldLabels() {
    for (const el of document.querySelectorAll("[data-field-label]")) {
      el.textContent = fieldLabel(el.dataset.fieldLabel);
    }
    for (const el of document.querySelectorAll("[data-new-value-for]")) {
      el.textContent = t("new_value_for", { field: fieldLabel(el.dataset.newValueFor) });
    }
  }

  function renderValues() {
    const fields = (subjectData && subjectData.fields) || {};
    for (const f of ALL_FIELDS) {
      const el = $(`value-${f}`);
      const v = fields[f];
      let text = "";
      if (subjectData) {
        text = f === "address" ? addressLine(v) : (v === undefined || v === null ? "" : String(v));
      }
      const missing = subjectData && text === "";
      el.textContent = missing ? t("not_given") : text;
      el.classList.toggle("missing", Boolean(missing));
      $(`remove-${f}`).disabled = !subjectData || v === undefined || v === null;
      $(`save-${f}`).disabled = !subjectData;
    }
  }

  function fillInputs() {
    const fields = (subjectData && subjectData.fields) || {};
    for (const f of TEXT_FIELDS) {
      const v = fields[f];
      $(`input-${f}`).value = v === undefined || v === null ? "" : String(v);
    }
    const a = fields.address && typeof fields.address === "object" ? fields.address : {};
    for (const k of ADDRESS_KEYS) {
      const v = a[k];
      $(`input-address-${k}`).value = v === undefined || v === null ? "" : String(v);
    }
  }

  async function loadSubject() {
    say("data-status", () => t("loading"));
    await guarded(async () => {
      subjectData = await api("GET", subjectPath());
      say("data-status", null);
      renderValues();
      fillInputs();
    }, (e) => say("data-status", failure(e)));
  }

  function clearFieldMessages(f) {
    say(`status-${f}`, null);
    say(`error-${f}`, null);
  }

  async function patchField(f, value, doneKey) {
    if (!subjectData) return;
    clearFieldMessages(f);
    const save = $(`save-${f}`);
    const remove = $(`remove-${f}`);
    save.disabled = true;
    remove.disabled = true;
    let ok = false;
    await guarded(async () => {
      await api("PATCH", subjectPath(), { fields: { [f]: value } }, { "If-Match": String(subjectData.version) });
      ok = true;
    }, async (e) => {
      const p = (e && e.problem) || {};
      if (e.status === 422) {
        const name = p.field ? String(p.field) : f;
        const reason = p.reason ? String(p.reason) : "";
        const target = ALL_FIELDS.includes(name.split(/[./]/)[0]) ? name.split(/[./]/)[0] : f;
        say(`error-${target}`, () => reason
          ? t("error_field_reason", { field: fieldLabel(name), reason: localReason(reason) ?? reason })
          : t("error_field", { field: fieldLabel(name) }));
      } else if (e.status === 412) {
        say(`error-${f}`, () => t("error_conflict"));
        await loadSubject();
      } else {
        say(`error-${f}`, failure(e));
      }
    });
    if (ok) {
      await loadSubject();
      say(`status-${f}`, () => t(doneKey));
    }
    renderValues();
  }

  function saveField(f) {
    clearFieldMessages(f);
    let value;
    if (f === "address") {
      value = {};
      for (const k of ADDRESS_KEYS) {
        const v = $(`input-address-${k}`).value.trim();
        if (v !== "") value[k] = v;
      }
      if (Object.keys(value).length === 0) {
        say(`error-${f}`, () => t("error_empty"));
        $("input-address-country").focus();
        return;
      }
    } else {
      value = $(`input-${f}`).value.trim();
      if (value === "") {
        say(`error-${f}`, () => t("error_empty"));
        $(`input-${f}`).focus();
        return;
      }
    }
    patchField(f, value, "saved");
  }

  function removeField(f) {
    patchField(f, null, "removed");
  }

  // ---- access log --------------------------------------------------------

  async function fetchWholeLog() {
    const all = [];
    let after = null;
    let truncated = false;
    for (let page = 0; page < LOG_MAX_PAGES; page += 1) {
      let q = `?limit=${LOG_FETCH_LIMIT}`;
      if (after !== null) q += `&after=${encodeURIComponent(after)}`;
      const r = await api("GET", subjectPath(`/access-log${q}`));
      const entries = (r && Array.isArray(r.entries)) ? r.entries : [];
      all.push(...entries);
      if (!r || r.next === null || r.next === undefined || r.next === "") {
        return { entries: all, truncated: false };
      }
      after = String(r.next);
      truncated = true;
    }
    return { entries: all, truncated };
  }

  function isRelease(e) {
    if (!e || typeof e !== "object") return false;
    if (e.outcome !== undefined && e.outcome !== null && e.outcome !== "allowed") return false;
    return Array.isArray(e.fields) && e.fields.length > 0;
  }

  function seqOf(e) {
    const n = Number(e.seq);
    return Number.isFinite(n) ? n : 0;
  }

  async function loadLog() {
    say("log-status", () => t("loading"));
    await guarded(async () => {
      const { entries, truncated } = await fetchWholeLog();
      logEntries = entries.filter(isRelease).sort((a, b) => seqOf(b) - seqOf(a));
      logTruncated = truncated;
      logPage = 0;
      say("log-status", null);
      renderLog();
    }, (e) => say("log-status", failure(e)));
  }

  function renderLog() {
    const list = $("log-list");
    list.replaceChildren();
    const pages = Math.max(1, Math.ceil(logEntries.length / LOG_PAGE_SIZE));
    if (logPage >= pages) logPage = pages - 1;
    const start = logPage * LOG_PAGE_SIZE;
    for (const e of logEntries.slice(start, start + LOG_PAGE_SIZE)) {
      const li = document.createElement("li");
      li.className = "access-entry";

      const head = document.createElement("p");
      head.className = "entry-head";
      const time = document.createElement("time");
      if (e.at) time.dateTime = String(e.at);
      time.textContent = fmtDate(e.at);
      const who = document.createElement("strong");
      who.className = "caller";
      who.textContent = e.caller ? String(e.caller) : t("log_unknown_caller");
      head.append(time, document.createTextNode(" — "), who);

      const purpose = document.createElement("p");
      purpose.className = "purpose";
      purpose.textContent = t("log_purpose", { purpose: purposeLabel(e.purpose) });

      const fields = document.createElement("p");
      fields.className = "fields";
      fields.textContent = t("log_fields", { fields: e.fields.map(fieldLabel).join(", ") });

      li.append(head, purpose, fields);
      list.append(li);
    }

    const empty = session && !messages.has($("log-status")) && logEntries.length === 0;
    if (empty) {
      const li = document.createElement("li");
      li.className = "muted empty";
      li.textContent = t("log_empty");
      list.append(li);
    }

    $("log-pager").hidden = logEntries.length <= LOG_PAGE_SIZE;
    $("log-newer").disabled = logPage === 0;
    $("log-older").disabled = logPage >= pages - 1;
    $("log-page").textContent = t("log_page", { n: logPage + 1, total: pages });

    const tr = $("log-truncated");
    tr.hidden = !logTruncated;
    tr.textContent = logTruncated ? t("log_truncated", { count: LOG_FETCH_LIMIT * LOG_MAX_PAGES }) : "";
  }

  function turnLogPage(delta) {
    logPage += delta;
    renderLog();
    $("log-title").scrollIntoView({ block: "start" });
  }

  // ---- consents ----------------------------------------------------------

  function marketingRecord() {
    const c = consentData && consentData.consents;
    return c && c.marketing ? c.marketing : null;
  }

  function renderConsents() {
    const box = $("consent-marketing");
    const rec = marketingRecord();
    box.checked = Boolean(rec && rec.granted);
    box.disabled = !consentData;
    const info = $("consent-marketing-info");
    if (!consentData) {
      info.textContent = "";
    } else if (!rec) {
      info.textContent = t("consent_never");
    } else {
      info.textContent = t(rec.granted ? "consent_given" : "consent_withdrawn", {
        date: fmtDate(rec.at),
        version: rec.policy_version === undefined || rec.policy_version === null ? "—" : String(rec.policy_version),
      });
    }
  }

  async function loadConsents() {
    await guarded(async () => {
      consentData = await api("GET", subjectPath("/consents"));
      renderConsents();
    }, (e) => say("error-consent", failure(e)));
  }

  async function changeMarketing() {
    const box = $("consent-marketing");
    const granted = box.checked;
    say("consent-status", null);
    say("error-consent", null);
    box.disabled = true;
    let ok = false;
    await guarded(async () => {
      await api("PUT", subjectPath("/consents/marketing"), { granted });
      ok = true;
    }, (e) => say("error-consent", failure(e)));
    await loadConsents();
    if (ok) say("consent-status", () => t("consent_saved"));
    renderConsents();
  }

  // ---- download ----------------------------------------------------------

  function offerJson(obj, filename) {
    const blob = new Blob([JSON.stringify(obj, null, 2) + "\n"], { type: "application/json" });
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = filename;
    a.hidden = true;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 30000);
  }

  async function downloadAll() {
    const btn = $("download");
    btn.disabled = true;
    say("error-download", null);
    say("download-status", () => t("download_preparing"));
    await guarded(async () => {
      const [subject, consents, log] = await Promise.all([
        api("GET", subjectPath()),
        api("GET", subjectPath("/consents")),
        fetchWholeLog(),
      ]);
      offerJson({ subject, consents, access_log: log.entries }, "pdvault-my-data.json");
      say("download-status", () => t("download_done", { file: "pdvault-my-data.json" }));
    }, (e) => {
      say("download-status", null);
      say("error-download", failure(e));
    });
    btn.disabled = false;
  }

  // ---- erase -------------------------------------------------------------

  function askErase() {
    say("error-erase", null);
    $("erase-confirm-box").hidden = false;
    $("erase").hidden = true;
    $("erase-cancel").focus();
  }

  function cancelErase() {
    $("erase-confirm-box").hidden = true;
    $("erase").hidden = false;
    $("erase").focus();
  }

  async function confirmErase() {
    const yes = $("erase-confirm");
    const no = $("erase-cancel");
    yes.disabled = true;
    no.disabled = true;
    say("error-erase", null);
    say("erase-status", () => t("erasing"));
    const answer = await guarded(() => api("DELETE", subjectPath()), (e) => {
      say("erase-status", null);
      say("error-erase", failure(e));
    });
    yes.disabled = false;
    no.disabled = false;
    if (!answer) return;
    forgetSession();
    erasure = answer;
    $("erase").hidden = false;
    renderErasure();
    show("screen-erased");
  }

  function renderErasure() {
    const e = erasure;
    const receipt = (e && e.receipt) || {};
    $("receipt").textContent = e ? JSON.stringify(e.receipt === undefined ? null : e.receipt, null, 2) : "";
    $("receipt-signature").textContent = e && e.signature !== undefined && e.signature !== null ? String(e.signature) : "";
    const erasedAt = (e && (e.erased_at || receipt.erased_at)) || "";
    $("erased-at").textContent = erasedAt ? t("erased_at", { date: fmtDate(erasedAt) }) : "";
    $("final-by").textContent = receipt.final_by ? t("erased_final_by", { date: fmtDate(receipt.final_by) }) : "";
  }

  function downloadReceipt() {
    if (!erasure) return;
    offerJson({ receipt: erasure.receipt, signature: erasure.signature }, "pdvault-erasure-receipt.json");
  }

  // ---- sign out ----------------------------------------------------------

  // The vault revokes the session's token (DELETE /v1/self/session), so a
  // copy of it left anywhere is refused too. The page forgets the session at
  // once either way: a failed call leaves only a token that expires by itself.
  function signOut() {
    const token = session && session.token;
    forgetSession();
    show("screen-signed-out");
    if (!token) return;
    fetch("/v1/self/session", {
      method: "DELETE",
      credentials: "omit",
      cache: "no-store",
      headers: { Authorization: `Bearer ${token}`, Accept: "application/problem+json" },
    }).catch(() => {});
  }

  // ---- render ------------------------------------------------------------

  function renderSessionInfo() {
    const el = $("session-info");
    el.textContent = session && session.expiresAt ? t("session_until", { time: fmtDate(session.expiresAt) }) : "";
  }

  function renderAll() {
    renderFieldLabels();
    renderValues();
    if (!subjectData) fillInputs();
    renderLog();
    renderConsents();
    renderSessionInfo();
    renderErasure();
    rerenderMessages();
  }

  // ---- start -------------------------------------------------------------

  function readCode() {
    const m = /^#code=([^&]+)/.exec(location.hash || "");
    // Take the code out of the address bar (and history) straight away.
    history.replaceState(null, "", location.pathname);
    if (!m) return null;
    try {
      return decodeURIComponent(m[1]);
    } catch (e) {
      return null;
    }
  }

  async function main() {
    const code = readCode();

    buildFields();
    for (const c of LANGS) {
      $(`lang-${c}`).addEventListener("click", () => setLang(c));
    }
    $("sign-out").addEventListener("click", signOut);
    $("log-newer").addEventListener("click", () => turnLogPage(-1));
    $("log-older").addEventListener("click", () => turnLogPage(1));
    $("consent-marketing").addEventListener("change", changeMarketing);
    $("download").addEventListener("click", downloadAll);
    $("erase").addEventListener("click", askErase);
    $("erase-cancel").addEventListener("click", cancelErase);
    $("erase-confirm").addEventListener("click", confirmErase);
    $("download-receipt").addEventListener("click", downloadReceipt);

    await setLang("ru");

    if (!code) {
      show("screen-expired");
      return;
    }
    await startSession(code);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", main);
  } else {
    main();
  }
})();
