//! Keeping GGML off Intel AMX. GGML's AMX path (`ggml_backend_amx_mul_mat`,
//! the `AMX` extra buffer type a `-march=native` build registers on
//! Sapphire Rapids and later) crashes on some machines: llama.cpp issue
//! 20824, still open, and seen on this project's machines for Q8_0 at
//! batch 4 and for whole-model decodes. GGML registers that buffer type
//! only after the kernel grants the process AMX tile state
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); a seccomp
//! filter makes that one request fail with EPERM, so GGML prints "AMX is
//! not ready to be used!" and measures such a CPU on its CPU_REPACK and
//! plain paths, which the `kernel_path` column names. Every other system
//! call is untouched.

/// Installs the filter once per process, on every thread (before any GGML
/// backend is created). A kernel without seccomp leaves AMX as it was.
pub fn keep_ggml_off_amx() {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let _ = deny_amx_permission();
        });
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn deny_amx_permission() -> std::io::Result<()> {
    const ARCH_REQ_XCOMP_PERM: u32 = 0x1023;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    // struct seccomp_data: nr at 0, arch at 4, args[0] at 16.
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    const ARG0_LOW: u32 = 16;
    let stmt = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u16, k: u32, jt: u8, jf: u8| libc::sock_filter { code, jt, jf, k };
    let load = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let equals = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let mut program = [
        stmt(load, ARCH),
        jump(equals, AUDIT_ARCH_X86_64, 0, 5),
        stmt(load, NR),
        jump(equals, libc::SYS_arch_prctl as u32, 0, 3),
        stmt(load, ARG0_LOW),
        jump(equals, ARCH_REQ_XCOMP_PERM, 0, 1),
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: plain system calls with a filter program that lives for the
    // duration of the call (the kernel copies it). NO_NEW_PRIVS is what an
    // unprivileged process needs to install a filter; the agent execs only
    // itself. TSYNC applies the filter to every thread of the process.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
            &fprog as *const libc::sock_fprog,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(all(test, target_arch = "x86_64", target_os = "linux"))]
mod tests {
    #[test]
    fn the_amx_permission_request_is_refused_and_other_arch_prctl_calls_work() {
        super::keep_ggml_off_amx();
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        const ARCH_GET_FS: libc::c_long = 0x1003;
        // SAFETY: arch_prctl queries with valid pointers.
        unsafe {
            let refused = libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            );
            assert_eq!(refused, -1);
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EPERM)
            );
            let mut fs: libc::c_ulong = 0;
            assert_eq!(
                libc::syscall(libc::SYS_arch_prctl, ARCH_GET_FS, &mut fs as *mut _),
                0
            );
            assert_ne!(fs, 0);
        }
    }
}
