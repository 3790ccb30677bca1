# Sourced by the bench scripts (and to be sourced before the README's bench commands): a load
# generator is a flood by design, so the gateways it starts run with the rate limits off
# (README, "Limits"). Every config key is also an environment variable (SPEC section 6).
export RINGGATE_IP_CONNECT_RATE=0
export RINGGATE_IP_MAX_OPEN=0
export RINGGATE_CONN_FRAME_RATE=0
export RINGGATE_USER_SEND_RATE=0
