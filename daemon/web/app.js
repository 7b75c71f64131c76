// meshd web app: a person in a claudemesh mesh.
//
// The browser holds the member's ed25519 key (localStorage), signs the hello like the
// CLI, and encrypts direct messages with crypto_box over keys converted from ed25519
// (libsodium's crypto_sign_ed25519_*_to_curve25519, here ed2curve), so a Claude peer
// and a person read each other. The broker sees ciphertext only. DM history stays in
// this browser: the broker keeps a message only until it is delivered.

const nacl = window.nacl;
const ed2curve = window.ed2curve;

const STORE_IDS = "meshd.identities.v1";
const STORE_CURRENT = "meshd.current.v1";
const HISTORY_CAP = 500;

// ---- encoding ----------------------------------------------------------------------

const enc = new TextEncoder();
const dec = new TextDecoder("utf-8", { fatal: true });

function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
function unhex(s) {
  if (typeof s !== "string" || s.length % 2 || /[^0-9a-f]/i.test(s)) throw new Error("bad hex");
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(s.substr(i * 2, 2), 16);
  return out;
}
function b64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}
function unb64(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}
function unb64url(s) {
  s = s.replace(/-/g, "+").replace(/_/g, "/").replace(/=+$/, "");
  return unb64(s + "===".slice((s.length + 3) % 4));
}
function randomId() {
  return hex(nacl.randomBytes(12));
}

// ---- identities ----------------------------------------------------------------------

function loadIdentities() {
  try {
    const v = JSON.parse(localStorage.getItem(STORE_IDS) || "[]");
    return Array.isArray(v) ? v.filter(validIdentity) : [];
  } catch {
    return [];
  }
}
function saveIdentities(ids) {
  localStorage.setItem(STORE_IDS, JSON.stringify(ids));
}
function validIdentity(i) {
  try {
    return typeof i.meshId === "string" && typeof i.memberId === "string" &&
      unhex(i.secretKey).length === 64 && unhex(i.publicKey).length === 32 &&
      hex(nacl.sign.keyPair.fromSecretKey(unhex(i.secretKey)).publicKey) === i.publicKey;
  } catch {
    return false;
  }
}
function identityKey(i) {
  return `${i.meshId}:${i.memberId}`;
}

// ---- DOM -----------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
function show(section) {
  for (const s of ["join", "empty", "chat", "keys", "invite", "dashboard", "admin"]) $(s).hidden = s !== section;
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// ---- joining ------------------------------------------------------------------------

function inviteFromHash() {
  const m = /^#join=([A-Za-z0-9_-]+=*)$/.exec(location.hash);
  if (!m) return null;
  try {
    const payload = JSON.parse(dec.decode(unb64url(m[1])));
    if (payload.v !== 1 || typeof payload.mesh_id !== "string") return null;
    return { token: m[1], payload };
  } catch {
    return null;
  }
}

function showJoin(invite) {
  const p = invite.payload;
  $("join-mesh").textContent = `${p.mesh_slug} (${p.mesh_id})`;
  $("join-broker").textContent = p.broker_url;
  $("join-role").textContent = p.role;
  $("join-expires").textContent = new Date(p.expires_at * 1000).toLocaleString();
  $("join-error").textContent = "";
  show("join");
  $("join-name").focus();
  $("join-btn").onclick = () => join(invite);
}

async function join(invite) {
  const name = $("join-name").value.trim();
  if (!name) {
    $("join-error").textContent = "Enter the name the mesh will see.";
    return;
  }
  $("join-btn").disabled = true;
  $("join-error").textContent = "";
  const kp = nacl.sign.keyPair();
  try {
    const resp = await fetch("/join", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        invite_token: invite.token,
        invite_payload: invite.payload,
        peer_pubkey: hex(kp.publicKey),
        display_name: name,
      }),
    });
    const body = await resp.json().catch(() => ({}));
    if (!resp.ok || body.ok !== true || typeof body.memberId !== "string") {
      throw new Error(body.error || `HTTP ${resp.status}`);
    }
    const id = {
      meshId: invite.payload.mesh_id,
      slug: invite.payload.mesh_slug,
      brokerUrl: invite.payload.broker_url,
      role: invite.payload.role,
      memberId: body.memberId,
      displayName: name,
      publicKey: hex(kp.publicKey),
      secretKey: hex(kp.secretKey),
      joinedAt: Date.now(),
    };
    const ids = loadIdentities().filter((i) => identityKey(i) !== identityKey(id));
    ids.push(id);
    saveIdentities(ids);
    localStorage.setItem(STORE_CURRENT, identityKey(id));
    history.replaceState(null, "", location.pathname);
    start();
  } catch (e) {
    $("join-error").textContent = `Could not join: ${e.message}`;
  } finally {
    $("join-btn").disabled = false;
  }
}

// ---- topics ----------------------------------------------------------------------------

/** A topic post's text: v1 is base64 of the UTF-8 text; v2 is a secretbox under the
 * topic key (XSalsa20-Poly1305, as the CLI and the reference web app write it). */
function topicText(raw, key) {
  try {
    if ((raw.bodyVersion || 1) === 1) return dec.decode(unb64(raw.ciphertext || ""));
    if (!key) return "[encrypted with the topic key, which this browser does not hold yet]";
    const m = nacl.secretbox.open(unb64(raw.ciphertext), unb64(raw.nonce), key);
    return m ? dec.decode(m) : "[does not open with this topic key]";
  } catch {
    return "[unreadable post]";
  }
}

/** The topic key sealed as the CLI and the reference seal it: base64(sender X25519
 * public key ‖ crypto_box(key, nonce, recipient X25519, sender X25519 secret)). */
function sealKey(key, recipientEd25519Hex, boxSk) {
  const to = ed2curve.convertPublicKey(unhex(recipientEd25519Hex));
  if (!to) throw new Error("not an ed25519 key");
  const nonce = nacl.randomBytes(24);
  const me = nacl.box.keyPair.fromSecretKey(boxSk).publicKey;
  const c = nacl.box(key, nonce, to, boxSk);
  const blob = new Uint8Array(32 + c.length);
  blob.set(me, 0);
  blob.set(c, 32);
  return { encryptedKey: b64(blob), nonce: b64(nonce) };
}

function openKey(encryptedKey, nonce, boxSk) {
  const blob = unb64(encryptedKey);
  if (blob.length < 32 + 16 + 32) return null;
  const k = nacl.box.open(blob.subarray(32), unb64(nonce), blob.subarray(0, 32), boxSk);
  return k && k.length === 32 ? k : null;
}

/** `@name` tokens of `text` (lowercased, 1–64 of [A-Za-z0-9_-]), at most 16. */
/** `*` (everyone) and `@group` conversations, as opposed to a peer's or a topic's. */
function isGroupConv(conv) {
  return conv === "*" || /^@[^\s]{1,64}$/.test(conv);
}

function mentionTokens(text) {
  const out = new Set();
  for (const m of text.matchAll(/(^|[^A-Za-z0-9_-])@([A-Za-z0-9_-]{1,64})(?![A-Za-z0-9_-])/g)) {
    out.add(m[2].toLowerCase());
    if (out.size >= 16) break;
  }
  return [...out];
}

/** Appends `text` to `parent` with each @mention in a <mark> (the reader's own marked
 * apart), as text nodes: peer text never becomes HTML. */
function appendWithMentions(parent, text, me) {
  let last = 0;
  for (const m of text.matchAll(/@[A-Za-z0-9_-]{1,64}/g)) {
    parent.append(text.slice(last, m.index));
    const mark = el("mark", m[0].slice(1).toLowerCase() === me ? "me" : null, m[0]);
    parent.append(mark);
    last = m.index + m[0].length;
  }
  parent.append(text.slice(last));
}

// ---- the mesh connection ---------------------------------------------------------------

class Mesh {
  constructor(identity, ui) {
    this.id = identity;
    this.ui = ui;
    this.sk = unhex(identity.secretKey);
    this.boxSk = ed2curve.convertSecretKey(this.sk);
    this.peers = new Map(); // routing key -> peer entry
    this.pending = new Map(); // send id -> history entry
    this.requests = new Map(); // _reqId -> {resolve, reject}
    this.ws = null;
    this.backoff = 500;
    this.closed = false;
    this.sessionId = `web-${randomId()}`;
    this.lastTyping = new Map();
  }

  url() {
    return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
  }

  connect() {
    const ws = new WebSocket(this.url());
    this.ws = ws;
    ws.onopen = () => this.hello();
    ws.onmessage = (ev) => {
      let f;
      try {
        f = JSON.parse(ev.data);
      } catch {
        return;
      }
      this.onFrame(f);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ui.connection(false, ev.reason || `closed (${ev.code})`);
      if (this.closed || ev.code === 4002) return;
      setTimeout(() => !this.closed && this.connect(), this.backoff);
      this.backoff = Math.min(this.backoff * 2, 15000);
    };
  }

  close() {
    this.closed = true;
    if (this.ws) this.ws.close(1000, "bye");
  }

  send(frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  hello() {
    const ts = Date.now();
    const canonical = `${this.id.meshId}|${this.id.memberId}|${this.id.publicKey}|${ts}`;
    const sig = nacl.sign.detached(enc.encode(canonical), this.sk);
    this.send({
      type: "hello",
      meshId: this.id.meshId,
      memberId: this.id.memberId,
      pubkey: this.id.publicKey,
      sessionId: this.sessionId,
      pid: 0,
      cwd: "",
      displayName: this.id.displayName,
      peerType: "human",
      channel: "web",
      timestamp: ts,
      signature: hex(sig),
    });
  }

  /** This browser's API key for the REST routes the WebSocket does not cover (topic
   * keys): minted once per identity over the connection (`apikey_create`, send+read,
   * acting as this member) and kept with the identity. */
  async apiKey(fresh) {
    const slot = `meshd.apikey.v1.${identityKey(this.id)}`;
    let secret = fresh ? null : localStorage.getItem(slot);
    if (!secret) {
      const r = await this.request({
        type: "apikey_create",
        label: `web app ${new Date().toISOString().slice(0, 10)}`,
        capabilities: ["send", "read"],
      });
      secret = r.secret;
      localStorage.setItem(slot, secret);
    }
    return secret;
  }

  /** A REST call on this origin; a refused key is replaced once. */
  async api(method, path, body) {
    for (const fresh of [false, true]) {
      const secret = await this.apiKey(fresh);
      const resp = await fetch(`/api/v1${path}`, {
        method,
        headers: { Authorization: `Bearer ${secret}`, "Content-Type": "application/json" },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      if (resp.status === 401 && !fresh) continue;
      return { status: resp.status, ok: resp.ok, body: await resp.json().catch(() => ({})) };
    }
    return { status: 401, ok: false, body: {} };
  }

  /** Sends a request and resolves with the frame that echoes its `_reqId`. */
  request(frame) {
    const id = randomId();
    return new Promise((resolve, reject) => {
      if (!this.send({ ...frame, _reqId: id })) {
        reject(new Error("offline"));
        return;
      }
      this.requests.set(id, { resolve, reject });
      setTimeout(() => {
        if (this.requests.delete(id)) reject(new Error("no answer from the broker"));
      }, 15000);
    });
  }

  onFrame(f) {
    const waiter = f._reqId && this.requests.get(f._reqId);
    if (waiter) {
      this.requests.delete(f._reqId);
      if (f.type === "error") waiter.reject(new Error(f.message || f.code));
      else waiter.resolve(f);
      return;
    }
    switch (f.type) {
      case "hello_ack":
        this.backoff = 500;
        this.listing = false;
        this.listAgain = false;
        this.ui.connection(true, "online");
        // Typing indicators and read receipts (meshd extension): opt in.
        this.send({ type: "signals" });
        // Groups are per connection: the ones joined here are joined again.
        for (const name of this.groups()) this.send({ type: "join_group", name });
        this.listPeers();
        this.send({ type: "topic_list", _reqId: randomId() });
        this.ui.sendReceipts();
        break;
      case "typing":
        this.ui.typing(f.fromMember || f.from, f.fromName);
        break;
      case "read":
        this.ui.readBy(f.fromMember || f.from, f.messageIds || []);
        break;
      case "peers_list":
        this.listing = false;
        if (this.listAgain) {
          this.listAgain = false;
          setTimeout(() => this.listPeers(), 200);
        }
        this.peers.clear();
        for (const p of f.peers || []) this.peers.set(p.pubkey, p);
        this.ui.peersChanged();
        this.ui.renderGroups();
        if (dash) dash.peersChanged();
        break;
      case "topic_list_response":
        this.ui.topicsListed(f.topics || []);
        break;
      case "mesh_event":
        if (dash) dash.onEvent(f);
        break;
      case "push":
        this.onPush(f);
        break;
      case "ack": {
        const h = this.pending.get(f.id);
        if (h) {
          this.pending.delete(f.id);
          h.state = "sent";
          h.messageId = f.messageId;
          this.ui.historyChanged();
        }
        break;
      }
      case "error":
        this.ui.error(f.message || f.code || "error");
        break;
      default:
        break;
    }
  }

  /** One `list_peers` in flight at a time, and a burst of joins asks once more after
   * it: a list is O(peers), so asking on every join of a 500-peer mesh would be O(n²). */
  listPeers() {
    if (this.listing) {
      this.listAgain = true;
      return;
    }
    this.listing = true;
    this.send({ type: "list_peers", _reqId: randomId() });
  }

  onPush(f) {
    if (f.subtype === "system") {
      if (/^peer_(joined|left|returned)$/.test(f.event || "")) {
        this.listPeers();
        if (dash) dash.onSystem(f);
      }
      return;
    }
    if (f.topicId) {
      this.ui.topicPost(f.topicId, {
        id: f.messageId,
        from: f.senderName || (f.senderPubkey || "").slice(0, 8),
        fromMember: f.senderMemberPubkey || f.senderPubkey,
        raw: { bodyVersion: f.bodyVersion || 1, nonce: f.nonce, ciphertext: f.ciphertext },
        at: Date.parse(f.createdAt) || Date.now(),
      });
      return;
    }
    const opened = this.open(f);
    const text = opened === null ? "[a message this browser cannot decrypt]" : opened;
    const from = f.senderPubkey || "";
    const peer = this.peers.get(from);
    const name = (peer && peer.displayName) || f.senderName || from.slice(0, 8);
    // A broadcast or group message (meshd names its target) goes to that conversation.
    if (f.targetSpec && isGroupConv(f.targetSpec)) {
      this.ui.record(f.targetSpec, {
        dir: "in",
        key: from,
        text,
        at: Date.parse(f.createdAt) || Date.now(),
        id: f.messageId,
        from: name,
      });
      return;
    }
    const conv = (peer && peer.memberPubkey) || from;
    this.ui.record(conv, {
      dir: "in",
      key: from,
      text,
      at: Date.parse(f.createdAt) || Date.now(),
      id: f.messageId,
      broadcast: !!f.targetSpec,
      from: name,
    }, from);
  }

  groupsKey() {
    return `meshd.groups.v1.${identityKey(this.id)}`;
  }
  groups() {
    try {
      const g = JSON.parse(localStorage.getItem(this.groupsKey()) || "[]");
      return Array.isArray(g) ? g.filter((n) => typeof n === "string") : [];
    } catch {
      return [];
    }
  }
  joinGroup(name) {
    const g = new Set(this.groups());
    g.add(name);
    localStorage.setItem(this.groupsKey(), JSON.stringify([...g]));
    this.send({ type: "join_group", name });
    this.listPeers();
  }

  /** A broadcast (`*`) or group (`@name`) message: base64 text, as the CLI sends them
   * (there is no shared key; the broker can read these, and the page says so). */
  multicast(target, text) {
    const id = randomId();
    const entry = { dir: "out", text, at: Date.now(), id, state: "sending", from: this.id.displayName };
    this.pending.set(id, entry);
    const ok = this.send({
      type: "send",
      id,
      targetSpec: target,
      priority: "now",
      nonce: b64(nacl.randomBytes(24)),
      ciphertext: b64(enc.encode(text)),
    });
    if (!ok) entry.state = "not sent (offline)";
    return entry;
  }

  /** crypto_box first (a DM), then base64 plaintext (a broadcast), as the CLI reads. */
  open(f) {
    try {
      if (f.senderPubkey && f.nonce && f.ciphertext) {
        const pk = ed2curve.convertPublicKey(unhex(f.senderPubkey));
        if (pk) {
          const m = nacl.box.open(unb64(f.ciphertext), unb64(f.nonce), pk, this.boxSk);
          if (m) return dec.decode(m);
        }
      }
    } catch {
      // not a crypto_box: try plaintext
    }
    try {
      return dec.decode(unb64(f.ciphertext || ""));
    } catch {
      return null;
    }
  }

  /** Encrypts `text` to the peer's routing key and sends it. */
  dm(peer, text) {
    const pk = ed2curve.convertPublicKey(unhex(peer.pubkey));
    if (!pk) throw new Error("the peer's key is not a valid ed25519 key");
    const nonce = nacl.randomBytes(24);
    const c = nacl.box(enc.encode(text), nonce, pk, this.boxSk);
    const id = randomId();
    const entry = { dir: "out", text, at: Date.now(), id, state: "sending" };
    this.pending.set(id, entry);
    const ok = this.send({
      type: "send",
      id,
      targetSpec: peer.pubkey,
      priority: "now",
      nonce: b64(nonce),
      ciphertext: b64(c),
    });
    if (!ok) entry.state = "not sent (offline)";
    return entry;
  }

  setStatus(status) {
    this.send({ type: "set_status", status });
  }

  /** At most one `typing` per peer every 2 s (the broker enforces the same). */
  typing(peer) {
    const now = Date.now();
    if (now - (this.lastTyping.get(peer.pubkey) || 0) < 2000) return;
    this.lastTyping.set(peer.pubkey, now);
    this.send({ type: "typing", to: peer.pubkey });
  }

  read(to, messageIds) {
    for (let i = 0; i < messageIds.length; i += 100) {
      this.send({ type: "read", to, messageIds: messageIds.slice(i, i + 100) });
    }
  }
}

// ---- the page --------------------------------------------------------------------------

const ui = {
  mesh: null,
  selected: null, // conversation key (member pubkey)
  history: {}, // conversation key -> entries
  unread: {},

  historyKey() {
    return `meshd.history.v1.${identityKey(this.mesh.id)}`;
  },
  loadHistory() {
    try {
      this.history = JSON.parse(localStorage.getItem(this.historyKey()) || "{}") || {};
    } catch {
      this.history = {};
    }
  },
  saveHistory() {
    for (const k of Object.keys(this.history)) {
      this.history[k] = this.history[k].slice(-HISTORY_CAP);
    }
    localStorage.setItem(this.historyKey(), JSON.stringify(this.history));
  },

  connection(on, text) {
    const c = $("conn");
    c.textContent = text;
    c.className = `conn ${on ? "on" : "off"}`;
  },
  error(text) {
    const li = el("li", "system", `broker: ${text}`);
    $("messages").append(li);
  },

  record(conv, entry, routingKey) {
    (this.history[conv] ||= []).push(entry);
    if (routingKey) this.lastKey[conv] = routingKey;
    if (conv !== this.selected) this.unread[conv] = (this.unread[conv] || 0) + 1;
    this.typingUntil[conv] = 0;
    this.saveHistory();
    this.peersChanged();
    this.renderGroups();
    this.historyChanged();
    this.sendReceipts();
  },
  typingUntil: {},

  /** Names @mention can complete to: live peers and the topic's posters. */
  mentionNames() {
    const names = new Set();
    for (const p of this.mesh.peers.values()) if (p.displayName) names.add(p.displayName);
    const t = this.selected && this.selected.startsWith("#") && this.topics.get(this.selected.slice(1));
    for (const p of (t && t.posts) || []) if (p.from) names.add(p.from);
    names.delete(this.mesh.id.displayName);
    return [...names].filter((n) => /^[A-Za-z0-9_-]{1,64}$/.test(n)).sort();
  },

  /** Offers completions for the `@prefix` before the caret. */
  suggestMentions() {
    const ta = $("compose");
    const before = ta.value.slice(0, ta.selectionStart);
    const m = /(^|[^A-Za-z0-9_-])@([A-Za-z0-9_-]*)$/.exec(before);
    const list = $("mention-list");
    if (!m) return this.hideMentions();
    const prefix = m[2].toLowerCase();
    const hits = this.mentionNames().filter((n) => n.toLowerCase().startsWith(prefix)).slice(0, 8);
    if (!hits.length) return this.hideMentions();
    list.replaceChildren();
    hits.forEach((n, i) => {
      const li = el("li", i === 0 ? "sel" : null, `@${n}`);
      li.onmousedown = (ev) => {
        ev.preventDefault();
        this.completeMention(n);
      };
      list.append(li);
    });
    list.hidden = false;
  },
  hideMentions() {
    $("mention-list").hidden = true;
  },
  completeMention(name) {
    const ta = $("compose");
    const before = ta.value.slice(0, ta.selectionStart).replace(/@([A-Za-z0-9_-]*)$/, `@${name} `);
    const after = ta.value.slice(ta.selectionStart);
    ta.value = before + after;
    ta.selectionStart = ta.selectionEnd = before.length;
    this.hideMentions();
    ta.focus();
  },

  /** Read receipts for what the open conversation shows, while the page is visible. */
  sendReceipts() {
    if (!this.mesh || !this.selected || document.visibilityState !== "visible") return;
    const byKey = new Map();
    for (const h of this.history[this.selected] || []) {
      if (h.dir === "in" && h.id && h.key && !h.receipted) {
        h.receipted = true;
        (byKey.get(h.key) || byKey.set(h.key, []).get(h.key)).push(h.id);
      }
    }
    for (const [key, ids] of byKey) this.mesh.read(key, ids);
    if (byKey.size) this.saveHistory();
  },

  typing(conv, name) {
    this.typingUntil[conv] = Date.now() + 4000;
    this.showTyping();
    setTimeout(() => this.showTyping(), 4100);
  },
  showTyping() {
    const on = this.selected && (this.typingUntil[this.selected] || 0) > Date.now();
    const peer = on && this.peerFor(this.selected);
    $("typing").textContent = on ? `${peer ? peer.displayName : "The peer"} is typing…` : "";
  },

  readBy(conv, ids) {
    const set = new Set(ids);
    let changed = false;
    for (const h of this.history[conv] || []) {
      if (h.dir === "out" && h.messageId && set.has(h.messageId) && h.state !== "read") {
        h.state = "read";
        changed = true;
      }
    }
    if (changed && conv === this.selected) this.historyChanged();
    else if (changed) this.saveHistory();
  },
  lastKey: {},

  conversations() {
    // Live peers by member, plus conversations with peers now offline.
    const byConv = new Map();
    for (const p of this.mesh.peers.values()) {
      if (p.memberPubkey === this.mesh.id.publicKey && p.pubkey === this.mesh.id.publicKey) continue;
      const conv = p.memberPubkey || p.pubkey;
      if (!byConv.has(conv)) byConv.set(conv, { conv, peer: p, online: true });
    }
    for (const conv of Object.keys(this.history)) {
      if (!byConv.has(conv) && !isGroupConv(conv)) byConv.set(conv, { conv, peer: null, online: false });
    }
    return [...byConv.values()];
  },

  peersChanged() {
    const list = $("peers");
    list.replaceChildren();
    const convs = this.conversations();
    $("peer-count").textContent = `(${convs.filter((c) => c.online).length} online)`;
    for (const c of convs) {
      const li = el("li");
      li.dataset.conv = c.conv;
      if (c.conv === this.selected) li.classList.add("sel");
      const dot = el("span", `dot ${c.online ? c.peer.status || "idle" : "off"}`);
      if (!c.online) dot.style.background = "var(--off)";
      const name = c.peer ? c.peer.displayName : this.nameFromHistory(c.conv);
      li.append(dot, el("span", "name", name));
      if (c.peer && c.peer.summary) li.title = c.peer.summary;
      if (this.unread[c.conv]) li.append(el("span", "unread", String(this.unread[c.conv])));
      li.append(el("span", "kind", c.peer ? c.peer.peerType || "" : "offline"));
      li.onclick = () => this.select(c.conv);
      list.append(li);
    }
  },
  nameFromHistory(conv) {
    const h = this.history[conv] || [];
    const e = h.find((x) => x.dir === "in" && x.from);
    return e ? e.from : conv.slice(0, 12);
  },

  peerFor(conv) {
    let best = null;
    for (const p of this.mesh.peers.values()) {
      if ((p.memberPubkey || p.pubkey) === conv) {
        if (!best || p.pubkey === this.lastKey[conv]) best = p;
      }
    }
    return best;
  },

  select(conv) {
    clearTimeout(this.keyTimer);
    $("key-state").textContent = "";
    $("claim-key").hidden = true;
    this.selected = conv;
    delete this.unread[conv];
    this.hideMentions();
    this.renderTopics();
    this.renderGroups();
    if (isGroupConv(conv)) {
      $("chat-title").textContent = conv === "*" ? "Everyone (broadcast)" : conv;
      $("key-state").textContent = "readable by the broker";
      $("key-state").className = "key plain";
      $("compose").disabled = false;
      $("send-btn").disabled = false;
      $("typing").textContent = "";
      this.peersChanged();
      this.historyChanged();
      $("compose").focus();
      return;
    }
    const peer = this.peerFor(conv);
    $("chat-title").textContent = peer ? `${peer.displayName}` : this.nameFromHistory(conv);
    $("compose").disabled = !peer;
    $("send-btn").disabled = !peer;
    this.peersChanged();
    this.historyChanged();
    this.showTyping();
    this.sendReceipts();
    if (peer) $("compose").focus();
  },

  topics: new Map(), // id -> {id, name, unread, mentions, posts: [] | null}

  topicsListed(list) {
    for (const t of list) {
      const cur = this.topics.get(t.id) || { unread: 0, mentions: 0, posts: null };
      this.topics.set(t.id, { ...cur, id: t.id, name: t.name, memberCount: t.memberCount });
    }
    this.renderTopics();
  },

  renderTopics() {
    const list = $("topics");
    list.replaceChildren();
    for (const t of [...this.topics.values()].sort((a, b) => (a.name < b.name ? -1 : 1))) {
      const li = el("li");
      li.dataset.topic = t.id;
      if (this.selected === `#${t.id}`) li.classList.add("sel");
      li.append(el("span", "name", `#${t.name}`));
      if (t.mentions) li.append(el("span", "mention", `@${t.mentions}`));
      if (t.unread) li.append(el("span", "unread", String(t.unread)));
      li.onclick = () => this.openTopic(t.id);
      list.append(li);
    }
  },

  /** Everyone, then every group a visible peer (or this page) is in, then groups
   * known only from history. */
  renderGroups() {
    const list = $("groups");
    if (!this.mesh) return;
    const mine = new Set();
    const all = new Set();
    for (const p of this.mesh.peers.values()) {
      for (const g of p.groups || []) {
        all.add(`@${g.name}`);
        if (p.pubkey === this.mesh.id.publicKey) mine.add(`@${g.name}`);
      }
    }
    for (const conv of Object.keys(this.history)) if (conv !== "*" && isGroupConv(conv)) all.add(conv);
    list.replaceChildren();
    for (const conv of ["*", ...[...all].sort()]) {
      const li = el("li");
      li.dataset.group = conv;
      if (conv === this.selected) li.classList.add("sel");
      li.append(el("span", "name", conv === "*" ? "Everyone" : conv));
      if (this.unread[conv]) li.append(el("span", "unread", String(this.unread[conv])));
      if (conv !== "*") li.append(el("span", "kind", mine.has(conv) ? "joined" : ""));
      li.onclick = () => this.select(conv);
      list.append(li);
    }
  },

  async createTopic(name) {
    const r = await this.mesh.request({ type: "topic_create", name });
    const t = r.topic || {};
    if (t.id) {
      this.topicsListed([{ id: t.id, name: t.name || name }]);
      await this.openTopic(t.id);
    }
  },

  async openTopic(id) {
    const t = this.topics.get(id);
    if (!t || !this.mesh) return;
    this.selected = `#${id}`;
    t.unread = 0;
    t.mentions = 0;
    $("chat-title").textContent = `#${t.name}`;
    $("compose").disabled = false;
    $("send-btn").disabled = false;
    $("typing").textContent = "";
    this.renderTopics();
    this.peersChanged();
    this.mesh.send({ type: "topic_join", topic: id });
    try {
      const h = await this.mesh.request({ type: "topic_history", topic: id, limit: 100 });
      const older = (h.messages || []).reverse().map((m) => ({
        id: m.id,
        from: m.senderName,
        fromMember: m.senderPubkey,
        raw: { bodyVersion: m.bodyVersion || 1, nonce: m.nonce, ciphertext: m.ciphertext },
        at: Date.parse(m.createdAt) || 0,
      }));
      // Posts that arrived while the history was on its way stay.
      const seen = new Set(older.map((p) => p.id));
      t.posts = [...older, ...(t.posts || []).filter((p) => !seen.has(p.id))];
    } catch (e) {
      this.error(`topic history: ${e.message}`);
      t.posts = t.posts || [];
    }
    this.mesh.send({ type: "topic_mark_read", topic: id });
    this.historyChanged();
    $("compose").focus();
    this.topicKeys(t);
  },

  /** The open topic's key: fetched (REST, with this browser's API key), re-sealed for
   * members still without it, polled while it is not sealed for us yet. */
  async topicKeys(t) {
    clearTimeout(this.keyTimer);
    if (this.selected !== `#${t.id}` || !this.mesh) return;
    let again = 0;
    try {
      if (!t.key) {
        const r = await this.mesh.api("GET", `/topics/${encodeURIComponent(t.name)}/key`);
        if (r.status === 409) t.keyState = "plain";
        else if (r.status === 404) {
          t.keyState = "waiting";
          again = 3000;
        } else if (r.ok) {
          t.key = openKey(r.body.encryptedKey, r.body.nonce, this.mesh.boxSk);
          t.keyState = t.key ? "sealed" : "error";
        } else t.keyState = "error";
      }
      if (t.key) {
        await this.resealFor(t);
        again = 5000;
      }
    } catch (e) {
      t.keyState = "error";
      again = 5000;
    }
    this.keyBadge(t);
    this.historyChanged();
    if (again) this.keyTimer = setTimeout(() => this.topicKeys(t), again);
  },

  async resealFor(t) {
    const r = await this.mesh.api("GET", `/topics/${encodeURIComponent(t.name)}/pending-seals`);
    for (const p of (r.ok && r.body.pending) || []) {
      try {
        await this.mesh.api("POST", `/topics/${encodeURIComponent(t.name)}/seal`, {
          memberId: p.memberId,
          ...sealKey(t.key, p.pubkey, this.mesh.boxSk),
        });
      } catch {
        // a bad key on one member does not stop the others
      }
    }
  },

  /** A plaintext topic gets a key: made here, sealed to ourselves, claimed. */
  async claimKey(t) {
    const key = nacl.randomBytes(32);
    const r = await this.mesh.api("POST", `/topics/${encodeURIComponent(t.name)}/claim-key`, {
      encryptedKeyPubkey: this.mesh.id.publicKey,
      ...sealKey(key, this.mesh.id.publicKey, this.mesh.boxSk),
    });
    if (!r.ok) throw new Error(r.body.error || `HTTP ${r.status}`);
    t.key = key;
    t.keyState = "sealed";
    this.topicKeys(t);
  },

  keyBadge(t) {
    const b = $("key-state");
    const label = {
      sealed: "end-to-end encrypted",
      waiting: "waiting for the topic key",
      plain: "plaintext (v1)",
      error: "topic key unavailable",
    }[t.keyState] || "";
    b.textContent = label;
    b.className = `key ${t.keyState || ""}`;
    $("claim-key").hidden = t.keyState !== "plain";
  },

  topicPost(id, post) {
    let t = this.topics.get(id);
    if (!t) {
      t = { id, name: id, unread: 0, mentions: 0, posts: null };
      this.topics.set(id, t);
      this.mesh.send({ type: "topic_list", _reqId: randomId() });
    }
    // Kept even while the topic is closed: its push can arrive before the post is
    // committed, so a history read on opening may not have it yet (merged by id).
    (t.posts ||= []).push(post);
    if (t.posts.length > 500) t.posts.splice(0, t.posts.length - 500);
    const mine = post.fromMember === this.mesh.id.publicKey;
    if (this.selected === `#${id}`) {
      this.mesh.send({ type: "topic_mark_read", topic: id });
      this.historyChanged();
    } else if (!mine) {
      t.unread += 1;
      const text = post.raw ? topicText(post.raw, t.key) : post.text;
      if (mentionTokens(text).includes(this.mesh.id.displayName.toLowerCase())) t.mentions += 1;
    }
    this.renderTopics();
  },

  historyChanged() {
    const list = $("messages");
    list.replaceChildren();
    if (this.selected && this.selected.startsWith("#")) {
      const t = this.topics.get(this.selected.slice(1));
      const me = this.mesh.id.displayName.toLowerCase();
      for (const p of (t && t.posts) || []) {
        const li = el("li", p.fromMember === this.mesh.id.publicKey ? "out" : "in");
        li.append(el("span", "who", p.from));
        const body = el("span", "text");
        appendWithMentions(body, p.raw ? topicText(p.raw, t.key) : p.text, me);
        li.append(body, el("span", "meta", new Date(p.at).toLocaleTimeString()));
        list.append(li);
      }
      list.scrollTop = list.scrollHeight;
      return;
    }
    const group = isGroupConv(this.selected || "");
    for (const h of this.history[this.selected] || []) {
      const li = el("li", h.dir);
      if (group && h.from) li.append(el("span", "who", h.from));
      li.append(el("span", "text", h.text));
      const meta = `${new Date(h.at).toLocaleTimeString()}${h.dir === "out" ? ` · ${h.state || "sent"}` : ""}${h.broadcast ? " · broadcast" : ""}`;
      li.append(el("span", "meta", meta));
      list.append(li);
    }
    list.scrollTop = list.scrollHeight;
  },

  submit() {
    const text = $("compose").value;
    if (!text.trim() || !this.selected) return;
    if (this.selected.startsWith("#")) {
      // v2 (secretbox under the topic key) when the page holds the key; v1 (base64
      // text, which the broker can read) in a plaintext topic.
      const names = new Set(this.mentionNames().map((n) => n.toLowerCase()));
      const id = randomId();
      // The broker does not echo a post to its sender: shown here.
      const t = this.topics.get(this.selected.slice(1));
      if (t) {
        (t.posts ||= []).push({ id, from: this.mesh.id.displayName, fromMember: this.mesh.id.publicKey, text, at: Date.now() });
      }
      const key = t && t.key;
      if (t && t.keyState === "waiting") {
        this.error("this topic is encrypted and its key has not been sealed for you yet");
        t.posts.pop();
        return;
      }
      const nonce = nacl.randomBytes(24);
      this.mesh.send({
        type: "send",
        id,
        targetSpec: this.selected,
        priority: "now",
        nonce: b64(nonce),
        ciphertext: b64(key ? nacl.secretbox(enc.encode(text), nonce, key) : enc.encode(text)),
        bodyVersion: key ? 2 : 1,
        mentions: mentionTokens(text).filter((t) => names.has(t)),
      });
      $("compose").value = "";
      this.hideMentions();
      this.historyChanged();
      return;
    }
    if (isGroupConv(this.selected)) {
      (this.history[this.selected] ||= []).push(this.mesh.multicast(this.selected, text));
      $("compose").value = "";
      this.saveHistory();
      this.historyChanged();
      return;
    }
    const peer = this.peerFor(this.selected);
    if (!peer) return;
    const entry = this.mesh.dm(peer, text);
    (this.history[this.selected] ||= []).push(entry);
    $("compose").value = "";
    this.saveHistory();
    this.historyChanged();
  },
};

// Outbound entries are saved when their ack arrives too.
const historyChangedBase = ui.historyChanged.bind(ui);
ui.historyChanged = () => {
  historyChangedBase();
  if (ui.mesh) ui.saveHistory();
};

function fillIdentitySelect(ids, current) {
  const sel = $("identity");
  sel.replaceChildren();
  for (const i of ids) {
    const o = el("option", null, `${i.slug} · ${i.displayName}`);
    o.value = identityKey(i);
    o.selected = identityKey(i) === current;
    sel.append(o);
  }
  sel.hidden = ids.length === 0;
  sel.onchange = () => {
    localStorage.setItem(STORE_CURRENT, sel.value);
    start();
  };
}

function start() {
  if (ui.mesh) ui.mesh.close();
  ui.mesh = null;
  const invite = inviteFromHash();
  const ids = loadIdentities();
  const current = localStorage.getItem(STORE_CURRENT);
  fillIdentitySelect(ids, current);
  if (invite) {
    showJoin(invite);
    return;
  }
  const id = ids.find((i) => identityKey(i) === current) || ids[0];
  if (!id) {
    $("status").hidden = true;
    $("invite-btn").hidden = true;
    $("dash-btn").hidden = true;
    $("admin-btn").hidden = true;
    show("empty");
    return;
  }
  localStorage.setItem(STORE_CURRENT, identityKey(id));
  fillIdentitySelect(ids, identityKey(id));
  ui.mesh = new Mesh(id, ui);
  ui.selected = null;
  ui.unread = {};
  ui.topics = new Map();
  $("topics").replaceChildren();
  $("groups").replaceChildren();
  ui.loadHistory();
  $("whoami").textContent = `You are ${id.displayName} in ${id.slug} (member ${id.memberId}, key ${id.publicKey.slice(0, 16)}…) on ${id.brokerUrl}`;
  $("chat-title").textContent = "Select a peer";
  $("compose").disabled = true;
  $("send-btn").disabled = true;
  $("messages").replaceChildren();
  $("status").hidden = false;
  // Admin actions show for admins only (the broker refuses them to others anyway).
  $("invite-btn").hidden = id.role !== "admin";
  $("dash-btn").hidden = id.role !== "admin";
  $("admin-btn").hidden = id.role !== "admin";
  if (dash) dash.stop();
  dash = null;
  show("chat");
  ui.peersChanged();
  ui.mesh.connect();
}

// ---- keys: export and import -------------------------------------------------------------

function showKeys() {
  const list = $("key-list");
  list.replaceChildren();
  for (const i of loadIdentities()) {
    const li = el("li");
    li.append(el("span", null, `${i.slug} · ${i.displayName} · `), el("code", null, i.publicKey));
    const forget = el("button", null, "Forget");
    forget.type = "button";
    forget.onclick = () => {
      if (!confirm(`Forget the key for ${i.slug}? Without an export it cannot come back.`)) return;
      saveIdentities(loadIdentities().filter((x) => identityKey(x) !== identityKey(i)));
      showKeys();
    };
    li.append(" ", forget);
    list.append(li);
  }
  $("keys-msg").textContent = "";
  show("keys");
}

$("keys-btn").onclick = showKeys;

// ---- administration: invites -------------------------------------------------------------

function showInvite() {
  if (!ui.mesh) return;
  $("invite-mesh").textContent = ui.mesh.id.slug;
  $("invite-error").textContent = "";
  $("invite-result").hidden = true;
  show("invite");
}

async function createInvite() {
  $("invite-error").textContent = "";
  $("invite-create").disabled = true;
  try {
    const r = await ui.mesh.request({
      type: "invite_create",
      role: $("invite-role").value,
      maxUses: Number($("invite-uses").value) || 1,
      expiresInS: Math.round((Number($("invite-days").value) || 1) * 86400),
      brokerUrl: ui.mesh.url(),
    });
    const link = r.webUrl || r.url;
    $("invite-web").textContent = link;
    $("invite-web").href = link;
    $("invite-cli").textContent = `claudemesh join ${r.url}`;
    const qr = qrcode(0, "L");
    qr.addData(link);
    qr.make();
    $("invite-qr").src = qr.createDataURL(3, 8);
    $("invite-meta").textContent = `${r.role}, ${r.maxUses} use(s), expires ${new Date(r.expiresAt * 1000).toLocaleString()}`;
    $("invite-result").hidden = false;
  } catch (e) {
    $("invite-error").textContent = `Could not create the invite: ${e.message}`;
  } finally {
    $("invite-create").disabled = false;
  }
}

$("invite-btn").onclick = showInvite;

// ---- administration: members, API keys, webhooks -------------------------------------------
// What `meshd member`, `meshd apikey` and webhook commands do, over the admin's own
// connection (ban, unban, list_bans, apikey_*, *_webhook) and REST (/members). The
// broker checks the role on every request; the page only hides what would be refused.

function adminButton(label, onclick) {
  const b = el("button", null, label);
  b.type = "button";
  b.dataset.action = label;
  b.onclick = async () => {
    b.disabled = true;
    try {
      await onclick();
      await loadAdmin();
    } catch (e) {
      $("admin-error").textContent = `${label}: ${e.message}`;
    } finally {
      b.disabled = false;
    }
  };
  return b;
}

async function loadAdmin() {
  const m = ui.mesh;
  $("admin-error").textContent = "";
  const [members, bans, keys, hooks, shares] = await Promise.all([
    m.api("GET", "/members"),
    m.request({ type: "list_bans" }),
    m.request({ type: "apikey_list" }),
    m.request({ type: "list_webhooks" }),
    m.request({ type: "share_list" }),
  ]);
  const tbody = $("admin-members");
  tbody.replaceChildren();
  for (const x of (members.ok && members.body.members) || []) {
    const tr = el("tr");
    tr.dataset.member = x.displayName;
    tr.append(el("td", null, x.displayName), el("td", null, x.role), el("td", null, x.online ? x.status : "offline"));
    const td = el("td");
    tr.append(td);
    tbody.append(tr);
    // A member another broker hosts is managed there (the broker refuses it here).
    if (x.broker) {
      td.append(el("span", "note", `on ${x.broker}`));
      continue;
    }
    const other = x.role === "admin" ? "member" : "admin";
    td.append(adminButton(x.role === "admin" ? "Make member" : "Make admin", () => m.request({ type: "member_role", target: x.pubkey, role: other })));
    if (x.pubkey !== m.id.publicKey) td.append(adminButton("Ban", () => m.request({ type: "ban", target: x.pubkey })));
  }
  const bl = $("admin-bans");
  bl.replaceChildren();
  for (const b of bans.bans || []) {
    const li = el("li", null, `${b.name} (since ${new Date(b.revokedAt).toLocaleString()}) `);
    li.dataset.member = b.name;
    li.append(adminButton("Unban", () => m.request({ type: "unban", target: b.pubkey })));
    bl.append(li);
  }
  const kl = $("admin-keys");
  kl.replaceChildren();
  for (const k of keys.keys || []) {
    const li = el("li", null, `${k.label} · ${k.prefix}… · ${k.capabilities.join(", ")}${k.revokedAt ? " · revoked" : ""} `);
    if (!k.revokedAt) li.append(adminButton("Revoke", () => m.request({ type: "apikey_revoke", id: k.id })));
    kl.append(li);
  }
  $("admin-fed").textContent = shares.broker
    ? `This broker is ${shares.broker}; ${shares.home ? "this mesh's home" : "it hosts a replica of this mesh (only its home can offer it)"}.`
    : "Federation is not configured on this broker.";
  const sl = $("admin-shares");
  sl.replaceChildren();
  for (const p of shares.peers || []) {
    const li = el("li", null, `${p.broker} · link ${p.link}${p.rttMs ? ` (${p.rttMs.toFixed(1)} ms)` : ""} · ${p.role ? `shared (${p.role})` : "not shared"}${p.flowing ? " · flowing" : ""} `);
    li.dataset.broker = p.broker;
    if (p.role === "offer" || p.role === "accept") {
      li.append(adminButton("Unshare", () => m.request({ type: "share_set", broker: p.broker, shared: false })));
    } else if (shares.home) {
      li.append(adminButton("Share", () => m.request({ type: "share_set", broker: p.broker, shared: true })));
    }
    sl.append(li);
  }
  const hl = $("admin-hooks");
  hl.replaceChildren();
  for (const h of hooks.webhooks || []) {
    const li = el("li", null, `${h.name}${h.active ? "" : " (inactive)"} `);
    li.append(adminButton("Delete", () => m.request({ type: "delete_webhook", name: h.name })));
    hl.append(li);
  }
}

$("admin-btn").onclick = async () => {
  if (!ui.mesh) return;
  $("admin-mesh").textContent = ui.mesh.id.slug;
  $("key-secret").textContent = "";
  $("hook-url").textContent = "";
  show("admin");
  try {
    await loadAdmin();
  } catch (e) {
    $("admin-error").textContent = e.message;
  }
};
$("admin-close").onclick = () => show("chat");
$("key-create").onclick = async () => {
  const caps = [["key-send", "send"], ["key-read", "read"], ["key-state-write", "state_write"]]
    .filter(([id]) => $(id).checked)
    .map(([, c]) => c);
  try {
    const r = await ui.mesh.request({ type: "apikey_create", label: $("key-label").value.trim() || "web", capabilities: caps });
    $("key-secret").textContent = `Secret (shown once): ${r.secret}`;
    await loadAdmin();
  } catch (e) {
    $("admin-error").textContent = `create key: ${e.message}`;
  }
};
$("hook-create").onclick = async () => {
  try {
    const r = await ui.mesh.request({ type: "create_webhook", name: $("hook-name").value.trim() });
    $("hook-url").textContent = `Post events to: ${r.url}`;
    await loadAdmin();
  } catch (e) {
    $("admin-error").textContent = `create webhook: ${e.message}`;
  }
};

// ---- the live dashboard ------------------------------------------------------------------

let dash = null;
const PRIO_COLOR = { now: "#c0392b", next: "#8a8780", low: "#2f7d4a" };
const STATUS_COLOR = { idle: "#2f7d4a", working: "#b4552d", dnd: "#6b3f6e" };
const GROUP_COLORS = ["#3b6ea8", "#c49a2c", "#7a4ea3", "#2c8c8c", "#a83b6e", "#5c7d2f", "#8c5a2c", "#4a4a8c"];
const FEED_CAP = 200;

/** A link as the dashboard shows it: the mesh flows over it, or the link is up and the
 * mesh does not flow ("stopped"), or the link's own state (down, connecting, …). */
function linkState(l) {
  if (l.flowing) return "flowing";
  return l.link === "up" ? "stopped" : l.link || "down";
}

class Dashboard {
  constructor(mesh) {
    this.mesh = mesh;
    this.canvas = $("graph");
    this.ctx = this.canvas.getContext("2d");
    this.nodes = new Map(); // routing key -> {x, y, peer}
    this.edges = []; // {from, to: [keys], color, born}
    this.recent = []; // message times (ms), for the rate
    this.prio = { now: 0, next: 0, low: 0 };
    this.bytes = 0;
    this.dirty = true;
    this.running = false;
    // Frame timing, read by the tests and the benchmark.
    this.draws = [];
    this.intervals = [];
    this.lastFrame = 0;
    window.__meshdDashboard = () => this.timing();
    window.__meshdResetTiming = () => {
      this.draws = [];
      this.intervals = [];
      this.recentTotal = 0;
    };
  }

  async start() {
    const sub = await this.mesh.request({ type: "dashboard_subscribe" });
    this.subscribed = true;
    this.links = new Map((sub.links || []).map((l) => [l.broker, { ...l, state: linkState(l) }]));
    this.renderLinks();
    this.resources();
    this.mesh.listPeers();
    this.running = true;
    const loop = (t) => {
      if (!this.running) return;
      if (this.lastFrame) this.pushSample(this.intervals, t - this.lastFrame);
      this.lastFrame = t;
      if (this.dirty || this.edges.length) {
        const t0 = performance.now();
        this.draw(Date.now());
        this.pushSample(this.draws, performance.now() - t0);
      }
      requestAnimationFrame(loop);
    };
    requestAnimationFrame(loop);
    this.cards();
  }

  stop() {
    this.running = false;
  }

  pushSample(arr, v) {
    arr.push(v);
    if (arr.length > 1200) arr.splice(0, arr.length - 1200);
  }

  timing() {
    const pct = (arr, q) => {
      if (!arr.length) return 0;
      const s = [...arr].sort((a, b) => a - b);
      return s[Math.min(s.length - 1, Math.floor(q * s.length))];
    };
    return {
      nodes: this.nodes.size,
      subscribed: !!this.subscribed,
      draws: this.draws.length,
      drawP50: pct(this.draws, 0.5),
      drawP95: pct(this.draws, 0.95),
      drawMax: pct(this.draws, 1),
      frameP50: pct(this.intervals, 0.5),
      frameP95: pct(this.intervals, 0.95),
      frameMax: pct(this.intervals, 1),
      events: this.recentTotal || 0,
    };
  }

  peersChanged() {
    const peers = [...this.mesh.peers.values()].sort((a, b) => (a.pubkey < b.pubkey ? -1 : 1));
    const n = peers.length || 1;
    const { width: w, height: h } = this.canvas;
    const r = Math.min(w, h) / 2 - 30;
    this.nodes.clear();
    peers.forEach((p, i) => {
      const a = (2 * Math.PI * i) / n - Math.PI / 2;
      this.nodes.set(p.pubkey, { x: w / 2 + r * Math.cos(a), y: h / 2 + r * Math.sin(a), peer: p });
    });
    // Me, in the middle when not listed (a dashboard does not list itself).
    if (!this.nodes.has(this.mesh.id.publicKey)) {
      this.nodes.set(this.mesh.id.publicKey, { x: w / 2, y: h / 2, peer: { displayName: "you", status: "idle" } });
    }
    this.dirty = true;
    this.cards();
  }

  onEvent(f) {
    if (f.kind === "status") {
      const n = this.nodes.get(f.from);
      if (n) n.peer.status = f.status;
      this.feed("timeline", `${this.time(f.at)} ${f.fromName || f.from.slice(0, 8)} → ${f.status}`);
      this.dirty = true;
      return;
    }
    if (f.kind === "audit") {
      this.feed("timeline", `${this.time(f.at)} audit: ${f.status}${f.fromName ? ` by ${f.fromName}` : ""}`);
      this.resourcesSoon();
      return;
    }
    if (f.kind === "resource") {
      this.resourcesSoon();
      return;
    }
    if (f.kind === "link") {
      const l = this.links.get(f.broker) || { broker: f.broker };
      l.flowing = f.status === "flowing";
      l.link = f.status === "down" ? "down" : l.link === "down" ? "up" : l.link || "up";
      l.state = f.status;
      this.links.set(f.broker, l);
      this.renderLinks();
      this.feed("timeline", `${this.time(f.at)} link to ${f.broker}: ${f.status}`);
      return;
    }
    if (f.kind !== "message") return;
    this.recentTotal = (this.recentTotal || 0) + 1;
    this.recent.push(Date.now());
    this.prio[f.priority] = (this.prio[f.priority] || 0) + 1;
    this.bytes += f.size || 0;
    const to = f.targetKind === "direct" ? [f.to] : f.targetKind === "broadcast" ? [...this.nodes.keys()].filter((k) => k !== f.from) : [];
    this.edges.push({ from: f.from, to, color: PRIO_COLOR[f.priority] || "#888", born: Date.now(), pulse: to.length === 0 || to.length > 64 });
    if (this.edges.length > 400) this.edges.splice(0, this.edges.length - 400);
    const via = f.broker ? ` via ${f.broker}` : "";
    const target = this.nodes.get(f.to);
    const toName = target ? target.peer.displayName : f.to.length > 16 ? `${f.to.slice(0, 12)}…` : f.to;
    this.feed("stream", `${this.time(f.at)} ${f.fromName || f.from.slice(0, 8)} → ${toName} · ${f.targetKind} · ${f.priority} · ${f.size} B${via}`, f.priority);
    this.cardsSoon();
    this.resourcesSoon();
  }

  onSystem(f) {
    const d = f.eventData || {};
    const what = { peer_joined: "joined", peer_returned: "returned", peer_left: "left" }[f.event] || f.event;
    this.feed("timeline", `${this.time(Date.parse(f.createdAt) || Date.now())} ${d.name || "a peer"} ${what}`);
  }

  time(ms) {
    return new Date(ms).toLocaleTimeString();
  }

  feed(id, text, cls) {
    const list = $(id);
    const li = el("li", cls || null, text);
    list.prepend(li);
    while (list.childElementCount > FEED_CAP) list.lastElementChild.remove();
  }

  /** The resource cards, asked again at most every 500 ms while events say they changed. */
  resourcesSoon() {
    if (this.resTimer) return;
    this.resTimer = setTimeout(() => {
      this.resTimer = null;
      this.resources();
    }, 500);
  }

  async resources() {
    let r;
    try {
      r = await this.mesh.request({ type: "dashboard_resources" });
    } catch (e) {
      return;
    }
    $("card-queue").textContent = `${r.queue.now} / ${r.queue.next} / ${r.queue.low}`;
    $("card-files").textContent = `${r.files.count}`;
    $("card-files").title = `${r.files.bytes.toLocaleString()} bytes held here`;
    $("card-mcp").textContent = `${r.mcpServers.count} (${r.mcpServers.online})`;
    $("card-skills").textContent = String(r.skills);
    $("card-tasks").textContent = `${r.tasks.open} / ${r.tasks.claimed} / ${r.tasks.done}`;
    $("card-schedules").textContent = String(r.schedules);
    for (const l of r.links || []) this.links.set(l.broker, { ...l, state: linkState(l) });
    this.renderLinks();
  }

  renderLinks() {
    const list = $("links");
    list.replaceChildren();
    for (const l of [...this.links.values()].sort((a, b) => (a.broker < b.broker ? -1 : 1))) {
      const state = l.state || linkState(l);
      const li = el("li", state, `${l.broker}: ${state}${l.rttMs ? ` · ${l.rttMs.toFixed(1)} ms` : ""}`);
      li.dataset.broker = l.broker;
      li.dataset.state = state;
      list.append(li);
    }
  }

  cardsSoon() {
    if (this.cardTimer) return;
    this.cardTimer = setTimeout(() => {
      this.cardTimer = null;
      this.cards();
    }, 250);
  }

  cards() {
    const now = Date.now();
    this.recent = this.recent.filter((t) => now - t < 60000);
    const peers = [...this.mesh.peers.values()];
    $("card-peers").textContent = String(peers.length);
    $("card-rate").textContent = String(this.recent.length);
    $("card-prio").textContent = `${this.prio.now} / ${this.prio.next} / ${this.prio.low}`;
    $("card-brokers").textContent = String(new Set(peers.map((p) => p.broker || "here")).size || 1);
    $("card-bytes").textContent = this.bytes.toLocaleString();
  }

  draw(now) {
    const c = this.ctx;
    const { width: w, height: h } = this.canvas;
    c.clearRect(0, 0, w, h);
    const many = this.nodes.size > 80;
    // Edges fade over 2 s.
    this.edges = this.edges.filter((e) => now - e.born < 2000);
    for (const e of this.edges) {
      const a = this.nodes.get(e.from);
      if (!a) continue;
      const alpha = 1 - (now - e.born) / 2000;
      c.globalAlpha = Math.max(alpha, 0);
      c.strokeStyle = e.color;
      c.lineWidth = 1.5;
      if (e.pulse) {
        c.beginPath();
        c.arc(a.x, a.y, 6 + 30 * (1 - alpha), 0, 2 * Math.PI);
        c.stroke();
        continue;
      }
      c.beginPath();
      for (const k of e.to) {
        const b = this.nodes.get(k);
        if (!b) continue;
        c.moveTo(a.x, a.y);
        c.quadraticCurveTo((a.x + b.x) / 2 + (b.y - a.y) * 0.15, (a.y + b.y) / 2 - (b.x - a.x) * 0.15, b.x, b.y);
      }
      c.stroke();
    }
    c.globalAlpha = 1;
    const groups = new Map();
    for (const [, n] of this.nodes) {
      const p = n.peer;
      const g = (p.groups && p.groups[0] && p.groups[0].name) || null;
      if (g && !groups.has(g)) groups.set(g, GROUP_COLORS[groups.size % GROUP_COLORS.length]);
      c.beginPath();
      c.arc(n.x, n.y, many ? 3 : 7, 0, 2 * Math.PI);
      c.fillStyle = STATUS_COLOR[p.status] || "#9a9892";
      c.fill();
      if (g) {
        c.strokeStyle = groups.get(g);
        c.lineWidth = 2;
        c.stroke();
      }
      if (!many) {
        c.fillStyle = "#1d1d1b";
        c.font = "11px system-ui, sans-serif";
        c.fillText(`${p.displayName}${p.broker ? ` @${p.broker}` : ""}`, n.x + 9, n.y + 4);
      }
    }
    this.dirty = false;
  }
}

$("dash-btn").onclick = async () => {
  if (!ui.mesh) return;
  show("dashboard");
  if (!dash) {
    dash = new Dashboard(ui.mesh);
    try {
      await dash.start();
    } catch (e) {
      dash = null;
      ui.error(`dashboard: ${e.message}`);
      show("chat");
    }
  }
};
$("dash-close").onclick = () => show("chat");
$("claim-key").onclick = async () => {
  const t = ui.selected && ui.selected.startsWith("#") && ui.topics.get(ui.selected.slice(1));
  if (!t) return;
  try {
    await ui.claimKey(t);
  } catch (e) {
    ui.error(`could not enable encryption: ${e.message}`);
  }
};
$("invite-close").onclick = () => show("chat");
$("invite-create").onclick = createInvite;
$("keys-close").onclick = start;
$("export-btn").onclick = () => {
  const blob = new Blob([JSON.stringify({ meshdIdentities: 1, identities: loadIdentities() }, null, 2)], {
    type: "application/json",
  });
  const a = el("a");
  a.href = URL.createObjectURL(blob);
  a.download = "meshd-keys.json";
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
};
$("import-file").onchange = async (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  try {
    const v = JSON.parse(await file.text());
    const incoming = (v && Array.isArray(v.identities) ? v.identities : []).filter(validIdentity);
    if (!incoming.length) throw new Error("no valid keys in this file");
    const ids = loadIdentities().filter((i) => !incoming.some((n) => identityKey(n) === identityKey(i)));
    saveIdentities([...ids, ...incoming]);
    $("keys-msg").textContent = `Imported ${incoming.length} key(s).`;
    showKeys();
    $("keys-msg").textContent = `Imported ${incoming.length} key(s).`;
  } catch (e) {
    $("keys-msg").textContent = `Import failed: ${e.message}`;
  }
  ev.target.value = "";
};

$("topic-new").onclick = () => {
  $("topic-form").hidden = !$("topic-form").hidden;
  if (!$("topic-form").hidden) $("topic-name").focus();
};
$("topic-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const name = $("topic-name").value.trim();
  if (!name || !ui.mesh) return;
  try {
    await ui.createTopic(name);
    $("topic-name").value = "";
    $("topic-form").hidden = true;
  } catch (e) {
    ui.error(`topic: ${e.message}`);
  }
};
$("group-new").onclick = () => {
  $("group-form").hidden = !$("group-form").hidden;
  if (!$("group-form").hidden) $("group-name").focus();
};
$("group-form").onsubmit = (ev) => {
  ev.preventDefault();
  const name = $("group-name").value.trim().replace(/^@/, "");
  if (!name || !ui.mesh) return;
  // No reply: the peer list (asked again) shows the group as joined.
  ui.mesh.joinGroup(name);
  $("group-name").value = "";
  $("group-form").hidden = true;
  ui.select(`@${name}`);
};

$("composer").onsubmit = (ev) => {
  ev.preventDefault();
  ui.submit();
};
$("compose").oninput = () => {
  if (!ui.mesh) return;
  ui.suggestMentions();
  const peer = ui.selected && !ui.selected.startsWith("#") && ui.peerFor(ui.selected);
  if (peer && $("compose").value) ui.mesh.typing(peer);
};
document.addEventListener("visibilitychange", () => ui.sendReceipts());
$("compose").onkeydown = (ev) => {
  const list = $("mention-list");
  if (!list.hidden && (ev.key === "Tab" || (ev.key === "Enter" && !ev.shiftKey))) {
    ev.preventDefault();
    const sel = list.querySelector("li.sel");
    if (sel) ui.completeMention(sel.textContent.slice(1));
    return;
  }
  if (!list.hidden && ev.key === "Escape") {
    ui.hideMentions();
    return;
  }
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    ui.submit();
  }
};
$("status").onchange = () => ui.mesh && ui.mesh.setStatus($("status").value);
window.addEventListener("hashchange", start);

start();
