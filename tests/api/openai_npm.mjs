// A dApp in JavaScript: the official `openai` npm client paying a live node with vouchers signed by viem.
// The client's `fetch` is wrapped: it hashes the exact body bytes it sends (requestHash), signs a Voucher
// for chargedTotal + the lane's quote, and adds the X-Payment header (docs/api.md, "JavaScript").
// Env: NODE_URL, PAYER_KEY, ADAPTER (an adapter id), BASE (the base model's served name), LANE.
// Prints one JSON object: what a dApp sees (models, answers, receipts) for the Python side to check.
import OpenAI from "openai";
import { keccak256, toBytes } from "viem";
import { privateKeyToAccount } from "viem/accounts";

const { NODE_URL, PAYER_KEY, ADAPTER, BASE } = process.env;
const LANE = Number(process.env.LANE);
const account = privateKeyToAccount(PAYER_KEY);
const info = await (await fetch(`${NODE_URL}/v1/node`)).json();
const types = {
  Voucher: [
    { name: "payer", type: "address" }, { name: "node", type: "address" },
    { name: "lane", type: "uint32" }, { name: "cumulative", type: "uint256" },
    { name: "requestHash", type: "bytes32" }, { name: "deadline", type: "uint64" },
  ],
};

function base64url(text) {
  return Buffer.from(text, "utf8").toString("base64").replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

async function paymentHeader(body) {
  const ch = await (await fetch(`${NODE_URL}/v1/channels/${account.address}/${LANE}`)).json();
  const voucher = {
    payer: account.address, node: info.node, lane: LANE,
    cumulative: BigInt(ch.chargedTotal) + BigInt(ch.quote.maxFee),
    requestHash: keccak256(toBytes(body)),
    deadline: BigInt(Math.floor(Date.now() / 1000) + 3600),
  };
  const d = info.domain;
  const signature = await account.signTypedData({
    domain: { name: d.name, version: d.version, chainId: d.chainId, verifyingContract: d.verifyingContract },
    types, primaryType: "Voucher", message: voucher,
  });
  return base64url(JSON.stringify({ ...voucher, cumulative: voucher.cumulative.toString(),
    deadline: Number(voucher.deadline), signature }));
}

// Pays for every POST: the body the SDK hands to fetch is the string it sends (UTF-8 on the wire).
async function paidFetch(url, init = {}) {
  if ((init.method || "GET").toUpperCase() === "POST" && typeof init.body === "string") {
    const headers = new Headers(init.headers);
    headers.set("X-Payment", await paymentHeader(init.body));
    init = { ...init, headers };
  }
  return fetch(url, init);
}

const client = new OpenAI({ apiKey: "unused", baseURL: `${NODE_URL}/v1`, fetch: paidFetch, maxRetries: 0 });
const models = (await client.models.list()).data;
const retrieved = await client.models.retrieve(BASE);
const chat = await client.chat.completions.create({
  model: ADAPTER, max_tokens: 6, temperature: 0, messages: [{ role: "user", content: "tell me of the sea" }],
});
const completion = await client.completions.create({ model: BASE, prompt: "the sea is", max_tokens: 5 });
const stream = await client.chat.completions.create({
  model: BASE, max_tokens: 5, stream: true, messages: [{ role: "user", content: "calm and blue" }],
});
const chunks = [];
for await (const chunk of stream) chunks.push(chunk);
let missing = null;
try {
  await client.models.retrieve("424242");
} catch (err) {
  missing = err.status;
}
const last = chunks[chunks.length - 1];
process.stdout.write(JSON.stringify({
  models: models.map((m) => ({ id: m.id, object: m.object, owned_by: m.owned_by, parent: m.parent })),
  retrieved: retrieved.id, missing,
  chat: { text: chat.choices[0].message.content, usage: chat.usage, receipt: chat.receipt },
  completion: { text: completion.choices[0].text, usage: completion.usage, receipt: completion.receipt },
  stream: { text: chunks.map((c) => c.choices[0]?.delta?.content ?? "").join(""), usage: last.usage,
            receipt: last.receipt, finish: last.choices[0]?.finish_reason },
}));
