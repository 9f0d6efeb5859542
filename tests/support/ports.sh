# shellcheck shell=bash
# tests/support/ports.sh — sourced by the test scripts.
# free_port: a TCP port on 127.0.0.1 that nothing answers on now, below Linux's ephemeral range
# (32768+): a port inside it can be taken at any moment by an outgoing connection, and a
# client's TIME_WAIT on it blocks a listener's bind even with SO_REUSEADDR.
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 12000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
}

# free_ports N [TAKEN...]: N free ports (free_port), distinct and none of TAKEN, on one line.
free_ports() {
    local n=$1 p taken
    shift
    taken=" $* "
    while ((n > 0)); do
        p=$(free_port)
        [[ $taken == *" $p "* ]] && continue
        taken+="$p "
        printf '%s' "$p"
        n=$((n - 1))
        ((n > 0)) && printf ' '
    done
    echo
}
