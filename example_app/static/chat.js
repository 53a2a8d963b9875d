// The room page: one client, the room's channel and the user's private one.
// Everything received is shown with textContent, never as HTML.
const { room, user, messagesUrl, loginUrl, client: clientUrl } = document.body.dataset;
// The extension serves its client beside the socket; the page says where.
const { Client } = await import(clientUrl);
const list = document.getElementById("messages");
const empty = document.getElementById("empty");
const template = document.getElementById("message-template");
const status = document.getElementById("status");
const notice = document.getElementById("notice");
const mentions = document.getElementById("mentions");
const online = document.getElementById("online");
const form = document.getElementById("compose");
const input = form.elements.text;

const shown = new Set([...list.children].map((item) => item.dataset.id));

function formatTime(at) {
  return new Date(at * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function fill(item, entry) {
  item.dataset.id = entry.id;
  item.dataset.at = entry.at;
  item.querySelector(".who").textContent = entry.user;
  item.querySelector(".text").textContent = entry.text;
  const time = item.querySelector("time");
  time.textContent = formatTime(entry.at);
  time.dateTime = new Date(entry.at * 1000).toISOString();
  item.classList.toggle("mine", entry.user === user);
  item.classList.toggle("mentions-me", entry.text.includes(`@${user}`));
}

/** Show a message once, in time order, whichever way it arrived. */
function show(entry) {
  if (shown.has(entry.id)) return;
  shown.add(entry.id);
  const item = template.content.firstElementChild.cloneNode(true);
  fill(item, entry);
  const stickToBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const later = [...list.children].find((other) => Number(other.dataset.at) > entry.at);
  list.insertBefore(item, later ?? null);
  empty.hidden = true;
  if (stickToBottom) list.scrollTop = list.scrollHeight;
}

function say(text, kind = "info") {
  notice.querySelector(".notice-text").textContent = text;
  notice.dataset.kind = kind;
  notice.hidden = false;
}
notice.querySelector("button").addEventListener("click", () => { notice.hidden = true; });

function setStatus(state, text) {
  status.dataset.state = state;
  status.textContent = text;
}

// Messages the server rendered: same markup, local time.
for (const item of list.children) {
  item.querySelector("time").textContent = formatTime(Number(item.dataset.at));
  item.classList.toggle("mentions-me", item.querySelector(".text").textContent.includes(`@${user}`));
}
list.scrollTop = list.scrollHeight;

const client = new Client();
/** The server ended this person's sockets with 4500 to 4999 (signed out in
 * another tab or window): the client does not reconnect, nor does the page. */
function signedOut() {
  setStatus("signed-out", "Signed out");
  const link = document.createElement("a");
  link.href = loginUrl;
  link.textContent = "Sign in again";
  say("You were signed out in another tab or window. ", "error");
  notice.querySelector(".notice-text").append(link, ".");
  input.disabled = true;
  form.querySelector("button").disabled = true;
}

client.on("connect", () => setStatus("connected", "Connected"));
client.on("disconnect", ({ code }) => {
  if (code >= 4500 && code <= 4999) signedOut();
  else setStatus("disconnected", "Reconnecting…");
});
client.on("error", (error) => {
  if (error.code === "unauthorized") {
    // No ticket for this page's cookie: signed out in another tab, or a
    // server without SECRET_KEY restarted with a new key. Retrying cannot help.
    client.close();
    setStatus("disconnected", "Signed out");
    say("Your sign-in has ended: reload the page to sign in again.", "error");
    return;
  }
  // Closed by the server while connecting (4500 to 4999): as a disconnect.
  if (client.closed) signedOut();
  else if (!client.connected) setStatus("disconnected", "Reconnecting…");
});

const channel = client.subscribe(`room:${room}`);
let subscriptions = 0;
// "message" is every event of the channel, as in Robe: this room broadcasts only messages.
channel.on("message", (message) => show(message.data));
channel.on("@subscribed", async ({ recovered }) => {
  subscriptions += 1;
  const again = subscriptions > 1;
  if (recovered) {
    say("Back online: the messages you missed were replayed.");
    return;
  }
  // Nothing could be replayed (first visit, server restarted, away too
  // long): fetch the room's recent messages instead.
  let messages;
  try {
    const response = await fetch(messagesUrl, { cache: "no-store" });
    if (!response.ok) throw new Error(`the server answered ${response.status}`);
    ({ messages } = await response.json());
  } catch (error) {
    say(`Could not load the room's messages: ${error.message}`, "error");
    return;
  }
  messages.forEach(show);
  if (again) say("Back online: the room's recent messages were reloaded.");
});

// Who is in the room: distinct people (two tabs of one person show once),
// from presence, which the server keeps for every tab on every worker.
function showOnline() {
  const names = new Set();
  for (const member of channel.presence.members.values()) {
    if (member.identity) names.add(member.identity);
  }
  online.replaceChildren(...[...names].sort().map((name) => {
    const item = document.createElement("li");
    item.textContent = name;
    item.classList.toggle("me", name === user);
    return item;
  }));
}
for (const event of ["sync", "join", "leave"]) channel.presence.on(event, showOnline);

const inbox = client.subscribe(`user:${user}`);
inbox.on("mention", ({ data }) => {
  mentions.querySelector(".empty")?.remove();
  const item = document.createElement("li");
  const head = document.createElement("div");
  head.className = "meta";
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = data.user;
  const link = document.createElement("a");
  link.href = encodeURIComponent(data.room); // relative to /rooms/
  link.textContent = `#${data.room}`;
  head.append(who, " in ", link);
  const text = document.createElement("p");
  text.className = "text";
  text.textContent = data.text;
  item.append(head, text);
  mentions.prepend(item);
});

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  try {
    await channel.send("message", { text });
  } catch (error) {
    if (!input.value) input.value = text;
    say(`Not sent: ${error.message}`, "error");
  }
});
