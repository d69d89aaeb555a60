//! The pipeline's own check: a target with a planted bug behind five
//! nested byte comparisons, which random inputs reach once in 2^40 tries
//! and coverage guidance finds one byte at a time. `scripts/fuzz.sh` runs
//! it first and fails unless AFL reports the crash: instrumentation, crash
//! detection and the script's counting all work.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if data.first() == Some(&b'b')
            && data.get(1) == Some(&b'i')
            && data.get(2) == Some(&b't')
            && data.get(3) == Some(&b'e')
            && data.get(4) == Some(&b's')
        {
            panic!("the planted bug");
        }
    });
}
