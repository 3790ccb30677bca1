#!/usr/bin/env bash
# Build uWebSockets' EchoServer, the reference of SPEC section 8's raw-frame budgets, outside
# this repository from its public source (nothing of it is committed here).
#
#   bash bench/uws.sh            -> prints the path of the built EchoServer (port 9001)
#
# Sources: UWS_GIT and USOCKETS_GIT (a URL or a local git directory; defaults: GitHub), at the
# commits below (uWebSockets 66dcff3 pins uSockets 86097c4 as its submodule). Built in
# UWS_BUILD (default ~/.cache/ringgate-uws) as the issue measured it: examples/EchoServer.cpp
# with compression disabled, no TLS, no zlib, -O3 -flto, epoll (uSockets' default on Linux).
set -euo pipefail
UWS_GIT=${UWS_GIT:-https://github.com/uNetworking/uWebSockets}
USOCKETS_GIT=${USOCKETS_GIT:-https://github.com/uNetworking/uSockets}
UWS_COMMIT=66dcff3
USOCKETS_COMMIT=86097c4
BUILD=${UWS_BUILD:-$HOME/.cache/ringgate-uws}
BIN=$BUILD/EchoServer-$UWS_COMMIT

if [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi
command -v g++ >/dev/null || { echo "FATAL: g++ needed (apt-get install g++)" >&2; exit 1; }
mkdir -p "$BUILD"
src=$BUILD/src
rm -rf "$src"
# A local directory may be a bare mirror: clone it, then check the commit out.
git clone -q "$UWS_GIT" "$src/uWebSockets"
git -C "$src/uWebSockets" checkout -q "$UWS_COMMIT"
git clone -q "$USOCKETS_GIT" "$src/uSockets"
git -C "$src/uSockets" checkout -q "$USOCKETS_COMMIT"

cd "$src"
sed 's/\.compression = uWS::CompressOptions([^)]*)/.compression = uWS::DISABLED/' \
  uWebSockets/examples/EchoServer.cpp > EchoServer.cpp
grep -q 'uWS::DISABLED' EchoServer.cpp || { echo "FATAL: could not disable compression" >&2; exit 1; }
mkdir -p obj
(cd obj && cc -O3 -flto -DLIBUS_NO_SSL -std=c11 -I../uSockets/src \
  -c ../uSockets/src/*.c ../uSockets/src/eventing/*.c ../uSockets/src/crypto/*.c)
g++ -O3 -flto -std=c++20 -DLIBUS_NO_SSL -DUWS_NO_ZLIB -IuWebSockets/src -IuSockets/src \
  EchoServer.cpp obj/*.o -o "$BIN"
echo "$BIN"
