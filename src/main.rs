//! The ferry command line: parse arguments, set up logging, hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// mimalloc as the global allocator. Requests whose alignment every mimalloc
/// block has (8 bytes) go through its plain entry points: its aligned ones
/// take a slower, general path for blocks over 1 KiB, and a request's buffers
/// and futures are such blocks. Larger alignments use the aligned ones.
struct MiMalloc;

/// Alignment of every block `mi_malloc` returns (a machine word).
const PLAIN_ALIGN: usize = std::mem::size_of::<usize>();

// SAFETY: each method passes the request to the matching mimalloc function,
// which returns null or a block of at least `size` bytes with the alignment
// asked for (the plain functions only when that is at most PLAIN_ALIGN, which
// every mimalloc block has); `mi_free` and the realloc functions accept any
// block from either kind.
unsafe impl std::alloc::GlobalAlloc for MiMalloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_malloc, mi_malloc_aligned};
        // SAFETY: any size and power-of-two alignment may be asked for.
        unsafe {
            if layout.align() <= PLAIN_ALIGN {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_zalloc, mi_zalloc_aligned};
        // SAFETY: as for `alloc`.
        unsafe {
            if layout.align() <= PLAIN_ALIGN {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use libmimalloc_sys::{mi_realloc, mi_realloc_aligned};
        // SAFETY: `ptr` came from this allocator with `layout`; the block
        // keeps that alignment.
        unsafe {
            if layout.align() <= PLAIN_ALIGN {
                mi_realloc(ptr.cast(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

/// A reverse-proxy load balancer with nginx's upstream semantics.
#[derive(Parser, Debug)]
#[command(name = "ferry", version, about)]
struct Cli {
    /// Configuration file.
    #[arg(short, long, global = true, default_value = "ferry.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate the configuration and print a summary; exit 1 when invalid (like nginx -t).
    Check,
    /// Start demo backends and a ferry in front of them on 127.0.0.1:8080.
    Demo,
    /// Ask the ferry running with this configuration for /healthz on its admin
    /// listener; exit 0 when it answers 200, 1 otherwise (for Docker's HEALTHCHECK).
    Health,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Some(Command::Check) => match ferry::config::Config::load(&cli.config).and_then(|mut c| {
            // Certificates, keys and CA files are read and checked too.
            ferry::tls::load(&mut c).map(|()| c)
        }) {
            Ok(cfg) => {
                print!("{}", cfg.summary());
                println!(
                    "ferry: the configuration file {} is valid",
                    cli.config.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferry: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Health) => match ferry::config::Config::load(&cli.config)
            .map_err(|e| e.to_string())
            .and_then(|cfg| ferry::admin::probe_healthz(&cfg))
        {
            Ok(addr) => {
                println!("ferry: healthy (http://{addr}/healthz answered 200)");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferry: unhealthy: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Demo) => match ferry::demo::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry demo: {e}");
                ExitCode::FAILURE
            }
        },
        None => {
            let cfg = match ferry::config::Config::load(&cli.config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ferry: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match ferry::server::run(cfg, None, None) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ferry: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
