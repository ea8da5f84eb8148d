#!/bin/sh
# The main job on the bundled example, inside the VM: three "pods" (network namespaces with an
# HTTP server each, at the addresses manifests/examples/web.yaml lists), ipvs-proxy following
# manifests/examples as node-a, then what an operator would look at and a few requests through
# the ClusterIP of the `web` Service.
set -eu
EXAMPLES=${1:-manifests/examples}
VIP=10.96.0.20

pod() { # name address
    ip netns add "$1"
    ip link add "veth-$1" type veth peer name eth0 netns "$1"
    ip -n "$1" addr add "$2/32" dev eth0
    ip -n "$1" link set lo up
    ip -n "$1" link set eth0 up
    ip -n "$1" route add default dev eth0
    ip link set "veth-$1" up
    ip route add "$2/32" dev "veth-$1"
    mkdir -p "/tmp/www-$1"
    echo "hello from pod $1 ($2)" > "/tmp/www-$1/index.html"
    ip netns exec "$1" busybox httpd -p 8080 -h "/tmp/www-$1"
}
pod web-a 10.244.1.5
pod web-b 10.244.2.7
pod web-c 10.244.3.9

echo "+ ipvs-proxy --manifests $EXAMPLES --hostname-override node-a --cluster-cidr 10.244.0.0/16 &"
ipvs-proxy --manifests "$EXAMPLES" --hostname-override node-a --cluster-cidr 10.244.0.0/16 \
    --metrics-bind-address 127.0.0.1:10249 > /tmp/ipvs-proxy.log 2>&1 &
PROXY=$!
i=0
until ipvsadm -Ln -t "$VIP:80" > /dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -gt 100 ]; then echo "ipvs-proxy did not program $VIP:80"; cat /tmp/ipvs-proxy.log; exit 1; fi
    sleep 0.1
done
sleep 0.5

echo; echo "+ ipvsadm -ln"; ipvsadm -ln
echo; echo "+ ip -brief addr show kube-ipvs0"; ip -brief addr show kube-ipvs0
echo; echo "+ ipset list -n"; ipset list -n
echo; echo "+ six requests to http://$VIP/"
for n in 1 2 3 4 5 6; do
    printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 "$VIP" 80 | tail -n 1
done
echo; echo "+ GET 127.0.0.1:10249/proxyMode"; (printf 'GET /proxyMode HTTP/1.0\r\n\r\n'; sleep 1) | nc -w 2 127.0.0.1 10249 | tail -n 1; echo
kill -TERM "$PROXY"
wait "$PROXY" || { echo "ipvs-proxy exited with $?"; cat /tmp/ipvs-proxy.log; exit 1; }
echo; echo "+ ipvs-proxy's log"; cat /tmp/ipvs-proxy.log
