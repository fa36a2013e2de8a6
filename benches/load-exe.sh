# Sourced by the scripts that build the load bench (metrics-cost.sh, metrics-instructions.sh).

# Reads cargo's JSON messages (`--message-format=json`) on stdin and prints the path of the
# executable of the bench target `load` (the last one built), or nothing.
load_exe() {
    grep '"reason":"compiler-artifact"' |
        grep '"kind":\["bench"\]' |
        grep '"name":"load"' |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' |
        tail -n 1
}
