//! The libc functions the shim's hooks stand in front of, found with
//! `dlsym(RTLD_NEXT)`. Resolved eagerly at load time (dlsym may allocate), and
//! lazily as a fallback for hooks called from other libraries' constructors.

use libc::{addrinfo, c_char, c_int, hostent, pid_t, size_t, sockaddr, socklen_t};
use std::sync::atomic::{AtomicUsize, Ordering};

fn lookup(name: &'static str) -> usize {
    // SAFETY: name is NUL-terminated (the macro appends "\0"); RTLD_NEXT is a valid handle.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr() as *const c_char) };
    if p.is_null() {
        crate::raw::warn(b"dvk: cannot find a libc function the shim wraps; aborting\n");
        // SAFETY: abort never returns and is always safe to call.
        unsafe { libc::abort() };
    }
    p as usize
}

macro_rules! next_symbol {
    ($($name:ident: fn($($arg:ty),*) -> $ret:ty;)*) => {
        $(
            pub fn $name() -> unsafe extern "C" fn($($arg),*) -> $ret {
                static PTR: AtomicUsize = AtomicUsize::new(0);
                let mut p = PTR.load(Ordering::Relaxed);
                if p == 0 {
                    p = lookup(concat!(stringify!($name), "\0"));
                    PTR.store(p, Ordering::Relaxed);
                }
                // SAFETY: p is the address dlsym returned for this libc function, whose C
                // prototype is exactly the signature written here.
                unsafe { std::mem::transmute::<usize, unsafe extern "C" fn($($arg),*) -> $ret>(p) }
            }
        )*

        /// Resolves every wrapped function now (at load time, where dlsym is safe).
        pub fn resolve_all() {
            $( let _ = $name(); )*
        }
    };
}

next_symbol! {
    bind: fn(c_int, *const sockaddr, socklen_t) -> c_int;
    connect: fn(c_int, *const sockaddr, socklen_t) -> c_int;
    listen: fn(c_int, c_int) -> c_int;
    accept: fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
    accept4: fn(c_int, *mut sockaddr, *mut socklen_t, c_int) -> c_int;
    getsockname: fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
    getpeername: fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
    getsockopt: fn(c_int, c_int, c_int, *mut libc::c_void, *mut socklen_t) -> c_int;
    setsockopt: fn(c_int, c_int, c_int, *const libc::c_void, socklen_t) -> c_int;
    getaddrinfo: fn(*const c_char, *const c_char, *const addrinfo, *mut *mut addrinfo) -> c_int;
    gethostbyname: fn(*const c_char) -> *mut hostent;
    gethostbyname_r: fn(*const c_char, *mut hostent, *mut c_char, size_t, *mut *mut hostent, *mut c_int) -> c_int;
    fork: fn() -> pid_t;
    setpgid: fn(pid_t, pid_t) -> c_int;
    getpgid: fn(pid_t) -> pid_t;
    getsid: fn(pid_t) -> pid_t;
    tcsetpgrp: fn(c_int, pid_t) -> c_int;
    wait: fn(*mut c_int) -> pid_t;
    waitpid: fn(pid_t, *mut c_int, c_int) -> pid_t;
    wait4: fn(pid_t, *mut c_int, c_int, *mut libc::rusage) -> pid_t;
    waitid: fn(libc::idtype_t, libc::id_t, *mut libc::siginfo_t, c_int) -> c_int;
}
