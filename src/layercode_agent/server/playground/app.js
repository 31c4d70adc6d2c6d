// The playground page: builds webhook bodies as Layercode does, posts them to the server's signing proxy
// (POST playground/api/agent, which forwards them signed to /api/agent), and reads the SSE answer as it
// streams. Barge-in works as on a call: the page aborts the request that streams the reply, stops speaking,
// and reports what the caller heard in the next message's `interruption_context`.
// No build step, no dependencies: plain ES2020 in a module script.

const API = "playground/api/agent";
const CONVERSATION_KEY = "layercode-playground:conversation";
const MUTED_KEY = "layercode-playground:muted";
// A sentence ends at . ! ? or an ellipsis (with closing quotes or brackets) followed by a space, or at a line break.
const SENTENCE_END = /[.!?…]+["'’”)\]]*\s+|\n+/g;

const $ = (id) => document.getElementById(id);
const ui = {
  conversation: $("conversation"),
  status: $("status"),
  form: $("composer"),
  input: $("message"),
  send: $("send"),
  stop: $("stop"),
  mic: $("mic"),
  mute: $("mute"),
  end: $("end"),
  newConversation: $("new-conversation"),
  conversationId: $("conversation-id"),
  dataForm: $("data-form"),
  dataInput: $("data-input"),
  hint: $("hint"),
};

// --- Identifiers ---------------------------------------------------------------------------------

function randomId(prefix) {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function storedConversationId() {
  try {
    return sessionStorage.getItem(CONVERSATION_KEY);
  } catch {
    return null;
  }
}

function rememberConversationId(id) {
  try {
    sessionStorage.setItem(CONVERSATION_KEY, id);
  } catch {
    // Private mode without storage: the conversation simply does not survive a reload.
  }
}

const state = {
  conversationId: null,
  sessionId: null,
  sessionOpen: false,
  sessionStartedAt: 0,
  transcript: [], // Layercode's session.end shape: {role, text, timestamp (ms)}
  active: null, // the reply streaming or being spoken
  lastTurnId: null,
  pendingInterruption: null, // reported on the next message, as Layercode does
};

// --- Speech out (speechSynthesis) ------------------------------------------------------------------

const speech = {
  supported: "speechSynthesis" in window && typeof window.SpeechSynthesisUtterance === "function",
  muted: false,
  blocked: false,
};

function loadMuted() {
  try {
    return localStorage.getItem(MUTED_KEY) === "1";
  } catch {
    return false;
  }
}

function speaking() {
  return speech.supported && !speech.muted && !speech.blocked;
}

function setMuted(muted) {
  speech.muted = muted || !speech.supported;
  try {
    localStorage.setItem(MUTED_KEY, muted ? "1" : "0");
  } catch {
    // ignore
  }
  ui.mute.setAttribute("aria-pressed", String(speech.muted));
  ui.mute.title = speech.supported ? "Do not speak replies aloud" : "This browser cannot speak (no speechSynthesis)";
  if (speech.muted && speech.supported) {
    window.speechSynthesis.cancel();
    // What is on screen now counts as heard: the caller chose to read instead of listen.
    if (state.active) {
      state.active.spoken = false;
      if (state.active.phase === "speaking") finishReply(state.active);
    }
  }
}

function queueSpeech(reply, final) {
  if (!reply.spoken || !speaking()) return;
  let end = reply.queuedUpTo;
  if (final) {
    end = reply.text.length;
  } else {
    SENTENCE_END.lastIndex = reply.queuedUpTo;
    for (let match; (match = SENTENCE_END.exec(reply.text)); ) end = match.index + match[0].length;
  }
  if (end <= reply.queuedUpTo) return;
  const start = reply.queuedUpTo;
  const segment = reply.text.slice(start, end);
  reply.queuedUpTo = end;
  if (!segment.trim()) {
    reply.spokenUpTo = Math.max(reply.spokenUpTo, end);
    return;
  }
  const utterance = new SpeechSynthesisUtterance(segment);
  reply.utterances += 1;
  const settle = () => {
    reply.utterances -= 1;
    if (reply.phase === "speaking" && reply.utterances <= 0) finishReply(reply);
  };
  utterance.onboundary = (event) => {
    // The word being spoken counts as heard, as with Layercode's word timestamps.
    const at = start + event.charIndex + (event.charLength || wordLength(segment, event.charIndex));
    reply.spokenUpTo = Math.max(reply.spokenUpTo, Math.min(at, end));
  };
  utterance.onend = () => {
    reply.spokenUpTo = Math.max(reply.spokenUpTo, end);
    settle();
  };
  utterance.onerror = (event) => {
    if (event.error === "not-allowed") {
      // Browsers refuse to speak before the user has interacted with the page: this reply is read, not heard.
      reply.spoken = false;
      if (!speech.blocked) note("Voice starts after your first click or key press (a browser rule).");
      speech.blocked = true;
    }
    settle();
  };
  window.speechSynthesis.speak(utterance);
}

function wordLength(text, from) {
  const match = /^\S*/.exec(text.slice(from));
  return match ? match[0].length : 0;
}

// --- Speech in (SpeechRecognition) -----------------------------------------------------------------

const Recognition = window.SpeechRecognition || window.webkitSpeechRecognition;
const mic = { recognition: null, on: false };

function setupMic() {
  if (!Recognition) return; // the button stays hidden; typing always works
  ui.mic.hidden = false;
  ui.mic.addEventListener("click", () => (mic.on ? stopMic() : startMic()));
}

function startMic() {
  const recognition = new Recognition();
  recognition.continuous = true;
  recognition.interimResults = true;
  recognition.lang = navigator.language || "en-US";
  recognition.onresult = (event) => {
    let interim = "";
    for (let i = event.resultIndex; i < event.results.length; i += 1) {
      const result = event.results[i];
      const text = result[0].transcript;
      if (result.isFinal) {
        ui.input.value = "";
        sendMessage(text);
      } else {
        interim += text;
      }
    }
    if (interim.trim()) {
      ui.input.value = interim;
      // The caller started talking over the agent: stop it now, report it with the final words.
      if (state.active && interim.trim().split(/\s+/).length >= 2) interrupt();
    }
  };
  recognition.onerror = (event) => {
    if (event.error === "not-allowed" || event.error === "service-not-allowed") {
      note("Microphone access was refused; typing still works.");
      stopMic();
    }
  };
  recognition.onend = () => {
    // Chrome ends recognition after a silence; keep listening while the mic is on.
    if (mic.on && mic.recognition === recognition) {
      try {
        recognition.start();
      } catch {
        stopMic();
      }
    }
  };
  mic.recognition = recognition;
  mic.on = true;
  try {
    recognition.start();
  } catch {
    stopMic();
    return;
  }
  ui.mic.setAttribute("aria-pressed", "true");
  ui.mic.title = "Listening: speak, or press again to stop";
}

function stopMic() {
  mic.on = false;
  const recognition = mic.recognition;
  mic.recognition = null;
  if (recognition) recognition.abort();
  ui.mic.setAttribute("aria-pressed", "false");
  ui.mic.title = "Speak instead of typing";
}

// --- The view ---------------------------------------------------------------------------------------

// Follow new words while the reader is at the bottom; leave them alone while they scroll back.
const scroller = ui.conversation.parentElement;
let followEnd = true;

function scrollToEnd(force = false) {
  if (force) followEnd = true;
  if (followEnd) scroller.scrollTop = scroller.scrollHeight;
}

function note(text, kind = "info") {
  const item = document.createElement("li");
  item.className = `note note-${kind}`;
  item.dataset.testid = "note";
  item.textContent = text;
  ui.conversation.append(item);
  scrollToEnd();
  return item;
}

function userBubble(text, turnId) {
  const item = document.createElement("li");
  item.className = "turn turn-user";
  item.dataset.testid = "turn-user";
  item.dataset.turnId = turnId;
  const who = document.createElement("span");
  who.className = "who visually-hidden";
  who.textContent = "You said:";
  const bubble = document.createElement("p");
  bubble.className = "bubble";
  bubble.textContent = text;
  item.append(who, bubble);
  ui.conversation.append(item);
  scrollToEnd();
}

function agentBubble(turnId, kind) {
  const item = document.createElement("li");
  item.className = "turn turn-agent";
  item.dataset.testid = "turn-agent";
  item.dataset.turnId = turnId;
  item.dataset.kind = kind;
  item.dataset.state = "waiting";
  item.setAttribute("aria-busy", "true");
  const who = document.createElement("span");
  who.className = "who visually-hidden";
  who.textContent = "Agent said:";
  const bubble = document.createElement("p");
  bubble.className = "bubble";
  bubble.dataset.testid = "reply";
  const heard = document.createElement("span");
  heard.className = "heard";
  heard.dataset.testid = "heard";
  const unheard = document.createElement("span");
  unheard.className = "unheard";
  unheard.dataset.testid = "unheard";
  unheard.title = "Streamed but not heard before the interruption";
  const typing = document.createElement("span");
  typing.className = "typing";
  const typingLabel = document.createElement("span");
  typingLabel.className = "visually-hidden";
  typingLabel.textContent = "The agent is answering";
  typing.append(typingLabel, document.createElement("i"), document.createElement("i"), document.createElement("i"));
  bubble.append(heard, unheard, typing);
  const meta = document.createElement("p");
  meta.className = "meta";
  meta.dataset.testid = "turn-meta";
  const latency = document.createElement("span");
  latency.className = "latency";
  latency.dataset.testid = "latency";
  latency.textContent = "waiting…";
  const data = document.createElement("span");
  data.className = "data";
  data.dataset.testid = "turn-data";
  const badge = document.createElement("span");
  badge.className = "badge";
  badge.dataset.testid = "badge";
  meta.append(latency, data, badge);
  item.append(who, bubble, meta);
  ui.conversation.append(item);
  scrollToEnd();
  return { item, heard, unheard, latency, data, badge, dataEvents: new Map() };
}

function ms(value) {
  return value < 1000 ? `${Math.round(value)} ms` : `${(value / 1000).toFixed(2)} s`;
}

function renderLatency(reply) {
  const parts = [];
  if (reply.firstTtsMs != null) parts.push(`first word ${ms(reply.firstTtsMs)}`);
  else if (reply.phase === "waiting") parts.push("waiting…");
  if (reply.totalMs != null) parts.push(`total ${ms(reply.totalMs)}`);
  else if (reply.phase === "interrupted") parts.push(`cut off after ${ms(reply.cutMs)}`);
  reply.view.latency.textContent = parts.join(" · ") || "no speech";
}

function renderData(reply, content) {
  let key;
  let label;
  if (content && typeof content === "object" && typeof content.tool === "string") {
    key = `tool:${content.tool}`;
    const previous = reply.view.dataEvents.get(key);
    const status = content.status ?? "?";
    label = previous ? `${previous} → ${status}` : `tool ${content.tool}: ${status}`;
  } else {
    key = `data:${reply.view.dataEvents.size}`;
    const json = JSON.stringify(content);
    label = `data ${json.length > 120 ? json.slice(0, 117) + "…" : json}`;
  }
  reply.view.dataEvents.set(key, label);
  reply.view.data.textContent = Array.from(reply.view.dataEvents.values()).join(" · ");
}

function setPhase(reply, phase) {
  reply.phase = phase;
  reply.view.item.dataset.state = phase;
  const busy = phase === "waiting" || phase === "streaming";
  reply.view.item.setAttribute("aria-busy", String(busy));
  updateControls();
}

function updateControls() {
  const active = state.active;
  ui.stop.disabled = !active;
  ui.input.disabled = !state.sessionOpen;
  ui.send.disabled = !state.sessionOpen;
  ui.end.textContent = state.sessionOpen ? "End session" : "Start session";
  let text;
  let status;
  if (!state.sessionOpen) {
    [text, status] = ["Session ended", "ended"];
  } else if (active && (active.phase === "waiting" || active.phase === "streaming")) {
    [text, status] = ["Agent is answering", "busy"];
  } else if (active && active.phase === "speaking") {
    [text, status] = ["Agent is speaking", "busy"];
  } else {
    [text, status] = ["Ready", "ready"];
  }
  ui.status.textContent = text;
  ui.status.dataset.state = status;
}

// --- SSE over fetch ---------------------------------------------------------------------------------

// Yields each `data:` event of an SSE body as it arrives, whatever the chunk boundaries.
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const blankLine = /\r\n\r\n|\n\n|\r\r/;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      for (let match; (match = blankLine.exec(buffer)); ) {
        const event = parseEvent(buffer.slice(0, match.index));
        buffer = buffer.slice(match.index + match[0].length);
        if (event) yield event;
      }
    }
    buffer += decoder.decode();
    const last = parseEvent(buffer);
    if (last) yield last;
  } finally {
    reader.releaseLock();
  }
}

function parseEvent(block) {
  const data = [];
  for (const line of block.split(/\r\n|\r|\n/)) {
    if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length) return null;
  try {
    return JSON.parse(data.join("\n"));
  } catch {
    return { type: "playground.unparsed", content: data.join("\n") };
  }
}

function post(body, options = {}) {
  return fetch(API, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
    ...options,
  });
}

async function errorText(response) {
  const text = await response.text();
  try {
    const json = JSON.parse(text);
    return [json.error, json.reason].filter(Boolean).join(": ") || text;
  } catch {
    return text || response.statusText;
  }
}

// --- Turns ------------------------------------------------------------------------------------------

function baseBody(type) {
  return { type, session_id: state.sessionId, conversation_id: state.conversationId };
}

async function runTurn(body, kind) {
  const reply = {
    turnId: body.turn_id,
    kind,
    text: "",
    phase: "waiting",
    spoken: speaking(),
    queuedUpTo: 0,
    spokenUpTo: 0,
    utterances: 0,
    firstTtsMs: null,
    totalMs: null,
    cutMs: null,
    sawEnd: false,
    controller: new AbortController(),
    started: performance.now(),
    view: agentBubble(body.turn_id, kind),
  };
  state.active = reply;
  state.lastTurnId = body.turn_id;
  setPhase(reply, "waiting");
  try {
    const response = await post(body, { signal: reply.controller.signal });
    if (!response.ok) throw new Error(`${response.status} ${await errorText(response)}`);
    const type = response.headers.get("content-type") || "";
    if (!type.startsWith("text/event-stream")) throw new Error(`expected an SSE stream, got ${type || "no type"}`);
    for await (const event of sseEvents(response.body)) {
      if (reply.phase === "interrupted") break;
      handleEvent(reply, event);
    }
    if (reply.phase === "interrupted") return;
    reply.totalMs = performance.now() - reply.started;
    if (!reply.sawEnd) note("The stream closed without response.end.", "error");
    queueSpeech(reply, true);
    if (reply.spoken && speaking() && reply.utterances > 0) {
      setPhase(reply, "speaking");
      renderLatency(reply);
    } else {
      finishReply(reply);
    }
  } catch (error) {
    if (reply.phase === "interrupted") return; // our own abort
    reply.totalMs = performance.now() - reply.started;
    reply.view.badge.textContent = "failed";
    note(`The turn failed: ${error.message}`, "error");
    finishReply(reply, "error");
  }
}

function handleEvent(reply, event) {
  if (event.type === "response.tts") {
    const content = String(event.content ?? "");
    if (reply.firstTtsMs == null) reply.firstTtsMs = performance.now() - reply.started;
    if (reply.phase === "waiting") setPhase(reply, "streaming");
    reply.text += content;
    reply.view.heard.textContent = reply.text;
    renderLatency(reply);
    queueSpeech(reply, false);
    scrollToEnd();
  } else if (event.type === "response.data") {
    renderData(reply, event.content);
  } else if (event.type === "response.end") {
    reply.sawEnd = true;
  } else if (event.type === "response.error") {
    note(`response.error: ${event.error ?? JSON.stringify(event)}`, "error");
  } else {
    note(`Unexpected event: ${JSON.stringify(event).slice(0, 200)}`, "error");
  }
}

function finishReply(reply, phase = "done") {
  if (reply.phase === "done" || reply.phase === "interrupted" || reply.phase === "error") return;
  if (reply.totalMs == null) reply.totalMs = performance.now() - reply.started;
  setPhase(reply, phase);
  renderLatency(reply);
  if (state.active === reply) state.active = null;
  record("assistant", reply.text);
  updateControls();
}

function heardText(reply) {
  if (!reply.spoken) return reply.text.trim(); // read, not listened to: what was shown
  // Listened to: up to the end of the word being spoken.
  return reply.text.slice(0, reply.spokenUpTo).trim();
}

// Barge-in: abort the request that streams the reply (the server sees Layercode's abort), stop speaking,
// and keep what the caller heard for the next message's interruption_context.
function interrupt() {
  const reply = state.active;
  if (!reply) return null;
  state.active = null;
  const heard = heardText(reply);
  reply.cutMs = performance.now() - reply.started;
  setPhase(reply, "interrupted");
  reply.controller.abort();
  if (speech.supported) window.speechSynthesis.cancel();
  reply.view.heard.textContent = heard;
  reply.view.unheard.textContent = reply.text.trim().startsWith(heard) ? reply.text.trim().slice(heard.length) : "";
  reply.view.badge.textContent = "interrupted";
  renderLatency(reply);
  record("assistant", heard);
  state.pendingInterruption = {
    previous_turn_interrupted: true,
    words_heard: heard ? heard.split(/\s+/).length : 0,
    text_heard: heard,
    assistant_turn_id: reply.turnId,
  };
  updateControls();
  return state.pendingInterruption;
}

function record(role, text) {
  if (text && text.trim()) state.transcript.push({ role, text: text.trim(), timestamp: Date.now() });
}

async function sendMessage(raw) {
  const text = raw.trim();
  if (!text || !state.sessionOpen) return;
  interrupt();
  const turnId = randomId("turn_");
  const body = { ...baseBody("message"), turn_id: turnId, text };
  if (state.pendingInterruption) body.interruption_context = state.pendingInterruption;
  state.pendingInterruption = null;
  userBubble(text, turnId);
  scrollToEnd(true);
  record("user", text);
  await runTurn(body, "message");
}

async function sendData(data) {
  const body = { ...baseBody("data"), turn_id: state.lastTurnId || randomId("turn_"), data };
  try {
    const response = await post(body);
    if (!response.ok) throw new Error(`${response.status} ${await errorText(response)}`);
    const answer = await response.json();
    const item = note(`data → ${JSON.stringify(answer)}`);
    item.dataset.testid = "data-reply";
  } catch (error) {
    note(`The data webhook failed: ${error.message}`, "error");
  }
}

// --- Sessions ---------------------------------------------------------------------------------------

async function startSession() {
  state.sessionId = randomId("sess_");
  state.sessionOpen = true;
  state.sessionStartedAt = Date.now();
  state.transcript = [];
  state.pendingInterruption = null;
  updateControls();
  await runTurn({ ...baseBody("session.start"), turn_id: randomId("turn_") }, "welcome");
}

function sessionEndBody() {
  const endedAt = Date.now();
  return {
    ...baseBody("session.end"),
    started_at: new Date(state.sessionStartedAt).toISOString(),
    ended_at: new Date(endedAt).toISOString(),
    duration: endedAt - state.sessionStartedAt,
    transcript: state.transcript,
  };
}

async function endSession() {
  if (!state.sessionOpen) return;
  interrupt();
  state.pendingInterruption = null;
  const body = sessionEndBody();
  state.sessionOpen = false;
  updateControls();
  try {
    const response = await post(body);
    if (!response.ok) throw new Error(`${response.status} ${await errorText(response)}`);
    const item = note(`Session ended; its transcript (${body.transcript.length} lines) was sent as session.end.`);
    item.dataset.testid = "session-ended";
  } catch (error) {
    note(`session.end failed: ${error.message}`, "error");
  }
}

function useConversation(id) {
  state.conversationId = id;
  rememberConversationId(id);
  ui.conversationId.textContent = id;
}

async function newConversation() {
  await endSession();
  ui.conversation.replaceChildren();
  useConversation(randomId("conv_"));
  await startSession();
  ui.input.focus();
}

// --- Wiring -----------------------------------------------------------------------------------------

function init() {
  speech.muted = loadMuted() || !speech.supported;
  setMuted(speech.muted);
  if (!speech.supported) ui.mute.disabled = true;
  setupMic();

  const previous = storedConversationId();
  useConversation(previous || randomId("conv_"));
  if (previous) note(`Continuing conversation ${previous} (its history is kept by the server).`);

  scroller.addEventListener("scroll", () => {
    followEnd = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 48;
  });
  window.addEventListener("resize", () => scrollToEnd());

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.input.value;
    ui.input.value = "";
    sendMessage(text);
  });
  ui.stop.addEventListener("click", () => {
    interrupt();
    ui.input.focus();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.active) interrupt();
  });
  ui.mute.addEventListener("click", () => setMuted(!speech.muted));
  // Any interaction with the page lifts the browser's block on speaking.
  for (const type of ["pointerdown", "keydown"]) {
    document.addEventListener(type, () => (speech.blocked = false), { capture: true });
  }
  ui.end.addEventListener("click", () => (state.sessionOpen ? endSession() : startSession()));
  ui.newConversation.addEventListener("click", () => newConversation());
  ui.dataForm.addEventListener("submit", (event) => {
    event.preventDefault();
    let data;
    try {
      data = JSON.parse(ui.dataInput.value);
    } catch (error) {
      note(`Not valid JSON: ${error.message}`, "error");
      return;
    }
    sendData(data);
  });
  // Closing or reloading the tab ends the session as hanging up would; keepalive lets the request
  // outlive the page (up to 64 KiB of body).
  window.addEventListener("pagehide", () => {
    if (!state.sessionOpen) return;
    state.active?.controller.abort();
    const body = sessionEndBody();
    state.sessionOpen = false;
    post(body, { keepalive: true }).catch(() => {});
  });
  window.addEventListener("pageshow", (event) => {
    // Back/forward cache restored a page whose session we ended on pagehide.
    if (event.persisted && !state.sessionOpen) startSession();
  });

  updateControls();
  ui.input.focus();
  startSession();
}

init();
