//! `warden`: the command line. The daemon is `wardend`, to which `warden daemon run` hands over.

fn main() {
    warden_cmd::cli_main()
}
