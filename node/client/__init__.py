"""The dApp SDK: vouchers, lanes, quotes and the OpenAI-client hook."""
