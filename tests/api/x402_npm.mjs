// A dApp in JavaScript paying a live node with x402 batch-settlement, with no integration code: the
// official `openai` npm client whose `fetch` is `@x402/fetch`'s wrapper around a stock `@x402/evm`
// batch-settlement client (docs/x402.md). It deposits on the first 402, then pays each request with a
// cumulative voucher; after a streamed answer (whose PAYMENT-RESPONSE is in its last chunk, which the
// SDK does not read) the next request resynchronises through the corrective 402.
// Env: NODE_URL, RPC_URL, PAYER_KEY, ADAPTER (an adapter id), CHAIN_ID.
// Prints one JSON object: each request's answer (text, receipt, PAYMENT-RESPONSE) and what went on the wire.
import OpenAI from "openai";
import { createPublicClient, http } from "viem";
import { privateKeyToAccount } from "viem/accounts";
import { toClientEvmSigner } from "@x402/evm";
import { BatchSettlementEvmScheme } from "@x402/evm/batch-settlement/client";
import { decodePaymentResponseHeader, wrapFetchWithPayment, x402Client } from "@x402/fetch";

const { NODE_URL, RPC_URL, PAYER_KEY, ADAPTER, CHAIN_ID } = process.env;
const network = `eip155:${CHAIN_ID}`;
const account = privateKeyToAccount(PAYER_KEY);
const signer = toClientEvmSigner(account, createPublicClient({ transport: http(RPC_URL) }));
const x402 = new x402Client().register(network, new BatchSettlementEvmScheme(signer));
x402.setSpendControls({ allowedAssets: true, maxAmountPerPayment: false });

let wire = [];  // this request's round trips: [paid?, status]
let lastResponse = null;
async function recordingFetch(input, init) {
  const request = new Request(input, init);
  const response = await fetch(request);
  wire.push([request.headers.has("PAYMENT-SIGNATURE"), response.status]);
  lastResponse = response;
  return response;
}

const paidFetch = wrapFetchWithPayment(recordingFetch, x402);
const client = new OpenAI({ apiKey: "unused", baseURL: `${NODE_URL}/v1`, fetch: paidFetch, maxRetries: 0 });

function settled(header) {
  return header ? decodePaymentResponseHeader(header) : null;
}

async function plain(prompt) {
  wire = [];
  const { data, response } = await client.chat.completions.create({
    model: ADAPTER, max_tokens: 5, messages: [{ role: "user", content: prompt }],
  }).withResponse();
  return { kind: "plain", text: data.choices[0].message.content, receipt: data.receipt,
           paymentResponse: settled(response.headers.get("PAYMENT-RESPONSE")), wire };
}

async function streamed(prompt) {
  wire = [];
  const stream = await client.chat.completions.create({
    model: ADAPTER, max_tokens: 6, stream: true, messages: [{ role: "user", content: prompt }],
  });
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  const last = chunks[chunks.length - 1];
  return { kind: "stream", text: chunks.map((c) => c.choices[0]?.delta?.content ?? "").join(""),
           receipt: last.receipt, paymentResponse: settled(last.payment_response),
           header: lastResponse.headers.get("PAYMENT-RESPONSE"), wire };
}

const answers = [];
answers.push(await plain("tell me of the sea"));  // a deposit
answers.push(await plain("calm and blue"));  // a voucher
answers.push(await streamed("the sea is"));
answers.push(await plain("and the waves"));  // the corrective 402, then paid
answers.push(await streamed("blue"));
answers.push(await plain("the end"));
process.stdout.write(JSON.stringify({ payer: account.address, answers }));
